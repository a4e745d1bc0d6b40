"""BTX end to end on a tiny seed: independent expert processes -> `tessera btx mix` -> btx-finetune."""

from __future__ import annotations

import json

import pytest
import torch
from tessera_testing import run_cli

from tessera.btx.data import Domain, parse_domains
from tessera.errors import InputError


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    p = tmp_path_factory.mktemp("corpus") / "recipes.jsonl"
    rows = [{"id": f"r{i}", "text": f"Recipe {i}: mix {i % 7 + 1} cups of flour with {i % 3 + 1} eggs, bake for {20 + i} minutes at 180 degrees."}
            for i in range(120)]
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return p


@pytest.fixture(scope="module")
def branched(tmp_path_factory, tiny_lm_dir, corpus):
    """Two experts trained by `tessera run btx-branch` (two processes, at most two at once)."""
    from tessera.recipes import run_recipe

    dump = tmp_path_factory.mktemp("branch")
    run_recipe("btx-branch", None, [f"seed_model={tiny_lm_dir}", f"domains=[docs:python-docs,food:{corpus}]", "steps=3",
                                    "batch_size=2", "seq_len=32", "lr=1e-2", "max_parallel=2", f"dump_dir={dump}"])
    return dump


def test_domain_specs():
    assert parse_domains(["a:python-docs", "mmlu"]) == [Domain("a", "python-docs"), Domain("mmlu", "mmlu")]
    with pytest.raises(InputError, match="name:source"):
        parse_domains(["/some/path.jsonl"])
    with pytest.raises(InputError, match="repeat"):
        parse_domains(["a:mmlu", "a:python-docs"])


def test_experts_train_in_independent_processes(branched, tiny_lm_dir):
    import os

    from transformers import AutoModelForCausalLM

    from tessera.btx.branch import train_expert
    from tessera.btx.train import TrainSettings

    res = json.loads((branched / "results.json").read_text())
    rows = {r["domain"]: r for r in res["experts"]}
    assert set(rows) == {"docs", "food"}
    pids = {r["pid"] for r in rows.values()}
    assert len(pids) == 2 and os.getpid() not in pids  # one OS process per expert
    seed = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
    food = AutoModelForCausalLM.from_pretrained(rows["food"]["folder"])
    docs = AutoModelForCausalLM.from_pretrained(rows["docs"]["folder"])
    w = "model.layers.0.mlp.down_proj.weight"
    sd_seed, sd_food, sd_docs = seed.state_dict()[w], food.state_dict()[w], docs.state_dict()[w]
    assert not torch.equal(sd_seed, sd_food) and not torch.equal(sd_food, sd_docs)
    # no shared state: the food expert trained alone in this process is bit-identical to the one trained beside docs
    alone = train_expert(str(tiny_lm_dir), Domain("food", rows["food"]["source"]), branched / "alone",
                         TrainSettings(steps=3, batch_size=2, lr=1e-2), seq_len=32, max_train_blocks=6, threads=1)
    assert torch.equal(AutoModelForCausalLM.from_pretrained(alone).state_dict()[w], sd_food)


def test_mix_cli_then_finetune_recipe_gives_a_routed_mixtral(branched, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tessera.recipes import run_recipe

    experts = [r["folder"] for r in json.loads((branched / "results.json").read_text())["experts"]]
    moe = tmp_path / "moe"
    r = run_cli("--quiet", "btx", "mix", *experts, "--out", str(moe), "--router-init", "hidden", "--prompts-per-expert", "4")
    assert r.returncode == 0, r.stderr
    gate = AutoModelForCausalLM.from_pretrained(moe).model.layers[0].mlp.gate.weight
    assert torch.allclose(gate.norm(dim=-1), torch.ones(2), atol=1e-5)  # hidden-state init: unit-norm rows
    dump = tmp_path / "ft"
    args = [f"model={moe}", f"domains=[docs:python-docs,food:{experts_corpus(branched)}]", "steps=3", "batch_size=2",
            "seq_len=32", "eval_blocks=2", "lr=1e-2", f"dump_dir={dump}"]
    # first a run killed (-9) while the trainer runs: the rerun below trains afresh over its leftovers
    from tessera_testing import kill_midway

    kill_midway(["run", "btx-finetune", *args], lambda: (dump / "trainer").is_dir())
    assert not (dump / "model").exists() and not (dump / "results.json").exists()
    run_recipe("btx-finetune", None, args)
    res = json.loads((dump / "results.json").read_text())
    assert set(res["heldout_perplexity"]) == {"docs", "food"} and all(v > 1 for v in res["heldout_perplexity"].values())
    assert (dump / "routing.png").stat().st_size > 1000
    assert len(res["routing_fractions"]["food"]) == 2  # layers
    model = AutoModelForCausalLM.from_pretrained(dump / "model")
    tok = AutoTokenizer.from_pretrained(dump / "model")
    assert type(model).__name__ == "MixtralForCausalLM"
    out = model.generate(**tok("Recipe 3:", return_tensors="pt"), max_new_tokens=3, do_sample=False)
    assert out.shape[1] > 3
    lines = (dump / "metrics.jsonl").read_text().splitlines()
    assert any("balance_loss" in json.loads(x) for x in lines)
    assert len(lines) == len(set(lines))  # no row twice after the kill
    # the rerun after the kill equals an uninterrupted run
    ref = tmp_path / "ft-ref"
    run_recipe("btx-finetune", None, [a for a in args if not a.startswith("dump_dir=")] + [f"dump_dir={ref}"])
    assert json.loads((ref / "results.json").read_text())["heldout_perplexity"] == res["heldout_perplexity"]

    def no_wall(rows):
        return [{k: v for k, v in json.loads(r).items() if not any(w in k for w in ("runtime", "per_second", "seconds"))}
                for r in rows]

    assert no_wall((ref / "metrics.jsonl").read_text().splitlines()) == no_wall(lines)
    r = run_cli("--quiet", "btx", "route", str(dump / "model"), "-d", "docs:python-docs", "--blocks", "2", "--seq-len", "32",
                "--out", str(tmp_path / "r.png"))
    assert r.returncode == 0, r.stderr
    fr = json.loads((tmp_path / "r.json").read_text())["docs"]
    assert len(fr) == 2 and all(abs(sum(row) - 1) < 1e-5 for row in fr)


def experts_corpus(branched) -> str:
    spec = json.loads((branched / "experts" / "spec-food.json").read_text())
    return spec["domain"]["source"]


def test_cli_errors_are_one_line_exit_2(tmp_path):
    r = run_cli("btx", "mix", str(tmp_path / "missing"), "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and r.stderr.strip().startswith("error:") and len(r.stderr.strip().splitlines()) == 1
    r = run_cli("run", "btx-finetune", f"model={tmp_path / 'none'}")
    assert r.returncode == 2 and "btx mix" in r.stderr


def test_branch_survives_kill_9(branched, tiny_lm_dir, corpus, tmp_path):
    """``kill -9`` of btx-branch while its second expert trains: the expert's process dies
    with it (no orphan trains on), and the rerun trains only the missing expert, bit-identical to
    the uninterrupted run's."""
    import time
    from pathlib import Path

    from safetensors.torch import load_file
    from tessera_testing import kill_midway

    from tessera.recipes import run_recipe

    dump = tmp_path / "branch"
    args = [f"seed_model={tiny_lm_dir}", f"domains=[docs:python-docs,food:{corpus}]", "steps=3", "batch_size=2",
            "seq_len=32", "lr=1e-2", "max_parallel=1", f"dump_dir={dump}"]
    spec = str(dump / "experts" / "spec-food.json")

    def orphans():
        found = []
        for p in Path("/proc").glob("[0-9]*"):
            try:
                if spec in (p / "cmdline").read_bytes().decode(errors="replace"):
                    found.append(p.name)
            except OSError:
                pass
        return found

    kill_midway(["run", "btx-branch", *args], lambda: bool(orphans()))  # the second expert is training
    deadline = time.monotonic() + 10
    while orphans() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not orphans(), "an expert process outlived the killed recipe"
    assert not (dump / "experts" / "expert-food").exists() and not (dump / "results.json").exists()
    run_recipe("btx-branch", None, args)
    res, ref = (json.loads((d / "results.json").read_text()) for d in (dump, branched))
    assert [r["domain"] for r in res["experts"]] == ["docs", "food"]
    rows = [json.loads(ln) for ln in (dump / "metrics.jsonl").read_text().splitlines()]
    assert rows == [json.loads(ln) for ln in (branched / "metrics.jsonl").read_text().splitlines()]  # once each
    for name in ("docs", "food"):
        a = load_file(str(dump / "experts" / f"expert-{name}" / "model.safetensors"))
        b = load_file(str(branched / "experts" / f"expert-{name}" / "model.safetensors"))
        assert all(torch.equal(a[k], b[k]) for k in b), name
    assert not [p.name for p in (dump / "experts").iterdir() if p.name.startswith(".")]


def test_branch_refuses_to_run_under_torchrun(monkeypatch, tmp_path):
    from tessera.recipes import run_recipe

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(InputError, match="launcher=torchrun"):
        run_recipe("btx-branch", None, [f"dump_dir={tmp_path / 'b'}"])
    assert not (tmp_path / "b").exists()
