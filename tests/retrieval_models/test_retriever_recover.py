"""Continued pretraining after pruning: distillation moves the pruned model toward the teacher."""

from __future__ import annotations

import json

import pytest
import torch
from tessera_testing import kill_midway

from tessera.errors import InputError
from tessera.retrieval import prune as P
from tessera.retrieval import recover as R


def test_losses_by_hand():
    h = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])
    t = torch.tensor([[[1.0, 0.0], [2.0, 0.0]]])
    assert R.hidden_distill_loss(h, t).item() == pytest.approx(0.5)  # cos 1 and 0
    assert R.hidden_distill_loss(h, t, mask=torch.tensor([[1, 0]])).item() == pytest.approx(0.0)
    z = torch.randn(2, 3, 7)
    assert R.logit_distill_loss(z, z).item() == pytest.approx(0.0, abs=1e-6)
    zt = torch.randn(2, 3, 7)
    p, q = zt.softmax(-1), z.softmax(-1)
    kl = (p * (p.log() - q.log())).sum(-1).mean()
    assert R.logit_distill_loss(z, zt).item() == pytest.approx(kl.item(), rel=1e-5)


@pytest.fixture(scope="module")
def pruned(tiny_llama8_dir):
    teacher, tok, _ = P.load_causal_lm(str(tiny_llama8_dir))
    student, _, _ = P.prune(str(tiny_llama8_dir), target_ratio=0.3, calibration="python-docs", n_samples=4, seq_len=32,
                            eval_samples=0)
    return teacher, tok, student, P.calibration_texts("python-docs")


@pytest.mark.parametrize("distill", ["hidden", "logits", "none"])
def test_recovery_moves_the_pruned_model(pruned, distill):
    import copy

    teacher, tok, student, texts = pruned
    student = copy.deepcopy(student)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    teacher_before = [p.clone() for p in teacher.parameters()]
    rep = R.continued_pretraining(student, tok, texts, teacher=teacher if distill != "none" else None, distill=distill,
                                  steps=8, batch_size=4, seq_len=32, lr=3e-3, held_out=4, log_every=2)
    assert rep.steps == 8 and rep.tokens == 8 * 4 * 32 and len(rep.loss_curve) == 4
    assert any(not torch.equal(before[k], v) for k, v in student.state_dict().items())
    assert all(torch.equal(a, b) for a, b in zip(teacher.parameters(), teacher_before))
    if distill == "hidden":
        assert rep.lm_weight == 0 and rep.hidden_cos_after > rep.hidden_cos_before
    else:
        assert rep.lm_weight == 1 and rep.lm_loss_after < rep.lm_loss_before


def test_recovery_bad_input(tiny_llama8_dir):
    student, tok, _ = P.load_causal_lm(str(tiny_llama8_dir))
    with pytest.raises(InputError, match="teacher"):
        R.continued_pretraining(student, tok, ["some text"], distill="hidden")
    with pytest.raises(InputError, match="not one of"):
        R.continued_pretraining(student, tok, ["some text"], teacher=student, distill="mse")
    with pytest.raises(InputError, match="too few"):
        R.continued_pretraining(student, tok, ["short"], distill="none", steps=2, batch_size=2, seq_len=64)


def test_prune_recipe_with_continued_pretraining(tiny_llama8_dir, tmp_path):
    from tessera.recipes import run_recipe

    args = [f"model={tiny_llama8_dir}", "target_ratio=0.5", "calibration=python-docs", "n_samples=4", "seq_len=32",
            "eval_samples=2", "cpt_steps=4", "cpt_text=python-docs", "cpt_batch_size=2", "cpt_seq_len=32",
            f"dump_dir={tmp_path / 'run'}"]
    # first a run killed (-9) during continued pretraining: the rerun prunes and recovers afresh
    kill_midway(["run", "retrieval-prune", *args], lambda: "cpt_step" in ((tmp_path / "run" / "metrics.jsonl").read_text()
                                                                          if (tmp_path / "run" / "metrics.jsonl").is_file() else ""))
    assert not (tmp_path / "run" / "model").exists() and not (tmp_path / "run" / "results.json").exists()
    dump = run_recipe("retrieval-prune", overrides=args)
    res = json.loads((dump / "results.json").read_text())
    assert res["recovery"]["steps"] == 4 and res["recovery"]["distill"] == "hidden"
    assert res["recovery"]["hidden_cos_after"] is not None
    rows = [json.loads(x) for x in (dump / "metrics.jsonl").read_text().splitlines()]
    assert any("cpt_loss" in r for r in rows)
    steps = [r["cpt_step"] for r in rows if "cpt_step" in r]
    layers = [r["layer"] for r in rows if "layer" in r]
    assert len(steps) == len(set(steps)) and len(layers) == len(set(layers)) == 8  # no row twice after the kill
    # the rerun after the kill equals an uninterrupted run
    from safetensors.torch import load_file

    ref = run_recipe("retrieval-prune", overrides=[a for a in args if not a.startswith("dump_dir=")] + [f"dump_dir={tmp_path / 'ref'}"])
    assert [json.loads(x) for x in (ref / "metrics.jsonl").read_text().splitlines()] == rows
    w_ref, w_run = (load_file(str(d / "model" / "model.safetensors")) for d in (ref, dump))
    assert w_ref.keys() == w_run.keys() and all(torch.equal(w_ref[k], w_run[k]) for k in w_ref)
    assert (dump / "model" / "model.safetensors").is_file()
