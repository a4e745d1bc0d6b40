"""Contrastive training: data format, BM25 negatives, loss and nDCG on a synthetic task, the recipe, DDP."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from retrieval_synthetic import ndcg_at_10
from tessera_testing import kill_midway, lines_at_least, run_torchrun
from tessera.data.types import Collection, Document, Query
from tessera.errors import DataFormatError, InputError
from tessera.retrieval import train as T
from tessera.retrieval.bm25 import BM25Index
from tessera.retrieval.encoder import build_retriever

HERE = Path(__file__).parent


def _write(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_rows_are_validated_with_file_and_line(tmp_path):
    good = {"query": ["find it", "q text"], "pos": [["", "pos a"], ["", "pos b"]], "neg": [["", "neg"]]}
    bad_rows = [
        {"query": "q", "pos": []},  # empty positives
        {"query": ["only one"], "pos": [["", "p"]], "neg": [["", "n"]]},  # query not [instr, text]
        {"query": ["", "q"], "pos": [["", "p"]]},  # no negatives but train_group_size 2 needs one
        "not json",
    ]
    for i, bad in enumerate(bad_rows):
        p = _write(tmp_path / f"bad{i}.jsonl", [good, bad])
        with pytest.raises(DataFormatError, match=rf"bad{i}\.jsonl:2"):
            T.read_training_rows(p, n_negatives=1)
    p = _write(tmp_path / "mixed.jsonl", [good, *bad_rows])
    data = T.read_training_rows(p, n_negatives=1, skip_bad=True)
    assert (data.n_rows, data.n_skipped, len(data.examples)) == (1, 4, 2)  # one example per positive
    assert data.examples[0] == T.Example("q text", "pos a", ("neg",), "find it", "", ("",))
    with pytest.raises(InputError, match="no training data"):
        T.read_training_rows("")


def test_bm25_negatives_skip_positives_and_top_ranks():
    docs = [Document(f"d{i}", "", f"apple banana note {i} " + ("apple " * (20 - i))) for i in range(20)]
    coll = Collection(docs=docs, queries=[Query("q1", "apple banana")], qrels={"q1": {"d0": 1, "d3": 1}})
    rows, stats = T.mine_bm25_negatives(coll, n_negatives=2, min_rank=5)
    assert len(rows) == 1 and stats["queries"] == 1
    negs = [t for _, t in rows[0]["neg"]]
    pos = {t for _, t in rows[0]["pos"]}
    assert len(negs) == 2 and not set(negs) & pos
    # BM25 prefers documents with more "apple": the negatives come from rank >= 5, not the top
    ranked = [docs[i].full_text for i, _ in BM25Index.build([d.full_text for d in docs]).search("apple banana", 20)]
    assert all(ranked.index(n) + 1 >= 5 for n in negs)
    rows, stats = T.mine_bm25_negatives(coll, n_negatives=1, min_rank=50)  # too deep: falls back
    assert stats["fallback_low_rank"] + stats["fallback_random"] == 1


def test_training_lowers_loss_and_raises_ndcg(tiny_lm_dir, synthetic):
    rows, test = synthetic
    model = build_retriever(str(tiny_lm_dir), max_seq_length=32, device="cpu")
    before = ndcg_at_10(model, test)
    ds, prompts = T.build_datasets(T.examples_from_rows(rows, 1), "reasonir")
    loss = T.make_loss(model)
    assert loss.scale == pytest.approx(50.0)  # temperature 0.02
    stats = T.train_retriever(model, ds, prompts, loss, "unused-scratch-dir-not-created", steps=30, batch_size=16,
                              lr=1e-3, logging_steps=5, quiet=True)
    after = ndcg_at_10(model, test)
    assert stats["steps"] == 30
    assert stats["loss_last"] < 0.5 * stats["loss_first"]
    assert after > before + 0.2, (before, after)


def test_instructions_group_batches(synthetic):
    rows, _ = synthetic
    rows = [dict(r, query=[("task A" if i % 2 else "task B"), r["query"][1]]) for i, r in enumerate(rows)]
    ds, prompts = T.build_datasets(T.examples_from_rows(rows, 1), "reasonir")
    assert set(prompts) == {"group0", "group1"}
    assert {p["query"] for p in prompts.values()} == {"<|user|>\ntask A\n<|embed|>\n", "<|user|>\ntask B\n<|embed|>\n"}
    assert all(p["positive"] == "<|embed|>\n" for p in prompts.values())
    assert sum(len(d) for d in ds.values()) == len(rows)


def test_recipe_with_gradcache_and_matryoshka(tiny_lm_dir, synthetic, tmp_path):
    from sentence_transformers import SentenceTransformer

    from tessera.recipes import run_recipe

    data = _write(tmp_path / "train.jsonl", synthetic[0])
    args = [f"data={data}", f"backbone={tiny_lm_dir}", f"dump_dir={tmp_path / 'run'}", "steps=4", "batch_size=8",
            "mini_batch_size=4", "matryoshka_dims=[32,16]", "lr=1e-3", "logging_steps=1", "max_seq_length=32"]
    # first a run killed (-9) mid-training: the rerun below starts the training afresh over its leftovers
    kill_midway(["run", "retrieval-train", *args], lines_at_least(tmp_path / "run" / "metrics.jsonl", 1))
    assert not (tmp_path / "run" / "model").exists() and any((tmp_path / "run").glob(".trainer-*"))
    dump = run_recipe("retrieval-train", overrides=args)
    assert {"config.yaml", "metrics.jsonl", "results.json", "model"} <= {p.name for p in dump.iterdir()}
    logged = [json.loads(line) for line in (dump / "metrics.jsonl").read_text().splitlines()]
    assert len(logged) >= 4 and all("loss" in r and "step" in r for r in logged)
    assert len({r["step"] for r in logged}) == len(logged)  # no row twice after the kill
    res = json.loads((dump / "results.json").read_text())
    assert res["steps"] == 4 and res["examples"] == len(synthetic[0]) and res["prompt_style"] == "reasonir"
    model = SentenceTransformer(str(dump / "model"), device="cpu")
    assert model.encode_query(["violin piano"], truncate_dim=16).shape == (1, 16)
    assert not any(p.name.startswith(".trainer-") for p in dump.iterdir())
    # the rerun after the kill equals an uninterrupted run
    import torch
    from safetensors.torch import load_file

    ref = run_recipe("retrieval-train", overrides=[a for a in args if not a.startswith("dump_dir=")] + [f"dump_dir={tmp_path / 'ref'}"])
    same = [json.loads(x)["loss"] for x in (ref / "metrics.jsonl").read_text().splitlines()]
    assert same == [r["loss"] for r in logged]
    w_ref, w_run = (load_file(str(next((d / "model").rglob("model.safetensors")))) for d in (ref, dump))
    assert w_ref.keys() == w_run.keys() and all(torch.equal(w_ref[k], w_run[k]) for k in w_ref)


def test_recipe_lora_merges_into_a_plain_model(tiny_lm_dir, synthetic, tmp_path):
    from sentence_transformers import SentenceTransformer

    from tessera.recipes import run_recipe

    data = _write(tmp_path / "train.jsonl", synthetic[0])
    out = tmp_path / "lora-model"
    run_recipe("retrieval-train", overrides=[
        f"data={data}", f"backbone={tiny_lm_dir}", f"dump_dir={tmp_path / 'run'}", f"out={out}", "steps=3",
        "batch_size=8", "lora=true", "lora_r=4", "lr=1e-2", "max_seq_length=32"])
    assert not (out / "adapter_config.json").exists()
    trained = SentenceTransformer(str(out), device="cpu").encode_query(["violin piano"])
    base = build_retriever(str(tiny_lm_dir), max_seq_length=32, device="cpu").encode_query(["violin piano"])
    assert abs(trained - base).max() > 1e-4  # the merged adapters changed the weights


def test_recipe_bad_input(tmp_path):
    from tessera.recipes import run_recipe

    with pytest.raises(InputError, match="no training data"):
        run_recipe("retrieval-train", overrides=[f"dump_dir={tmp_path}"])
    bad = _write(tmp_path / "bad.jsonl", [{"query": ["", "q"], "pos": [["", "p"]], "neg": []}])
    with pytest.raises(DataFormatError, match="bad.jsonl:1"):
        run_recipe("retrieval-train", overrides=[f"data={bad}", f"dump_dir={tmp_path / 'r'}"])


def test_two_process_ddp_gathers_negatives_across_ranks(tiny_lm_dir, tmp_path):
    run_torchrun(HERE / "ddp_worker.py", tiny_lm_dir, tmp_path, timeout=120, env={"TOKENIZERS_PARALLELISM": "false"})
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for r in ranks:
        assert r["world_size"] == 2 and r["steps"] == 3
        # 4 local queries scored against 2 ranks x 4 queries x (1 positive + 1 hard negative)
        assert r["shapes"] and all(s == [4, 16] for s in r["shapes"])
    assert ranks[0]["checksum"] == pytest.approx(ranks[1]["checksum"], rel=1e-9)
