"""The training loop: a two-process gloo DDP step, checkpoints and resume, learning-rate schedule."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent / "models"))
from mm_helpers import tiny_data, tiny_lm  # noqa: E402
from tessera_testing import run_torchrun  # noqa: E402

from tessera.train import DistInfo, LoopState, cosine_lr, load_checkpoint, save_checkpoint, train_loop  # noqa: E402


def test_two_process_gloo_ddp_step_matches_single_process_reference(tmp_path):
    run_torchrun(HERE / "ddp_mm_worker.py", tmp_path, timeout=180)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["world"] == r1["world"] == 2
    assert r0["checksum"] == pytest.approx(r1["checksum"], rel=1e-9)  # DDP kept the replicas equal
    assert r0["moved"] > 1e-3  # the step changed the weights
    assert r0["max_diff_vs_reference"] < 1e-5  # = one step on the mean of both ranks' losses
    assert r0["flops"] == 2.0  # FLOPs counted over both ranks


def test_checkpoint_roundtrip_and_resume_is_exact(tmp_path):
    data = tiny_data("transfusion")
    info = DistInfo()

    def get_batch(step):
        return data.batch(4, np.random.default_rng([0, step]))

    def run(lm, opt, steps, state):
        torch.manual_seed(123 + state.step)  # the loop's diffusion noise
        return train_loop(lm, opt, get_batch, steps, state, info, flops_fn=lambda b: 10.0)

    lm_a = tiny_lm("transfusion", "mot", data)
    opt_a = torch.optim.AdamW(lm_a.parameters(), lr=1e-3)
    st = run(lm_a, opt_a, 2, LoopState())
    save_checkpoint(tmp_path / "ck", lm_a, opt_a, st, {"note": "x"})
    st_a = run(lm_a, opt_a, 3, st)

    lm_b = tiny_lm("transfusion", "mot", data, seed=5)
    opt_b = torch.optim.AdamW(lm_b.parameters(), lr=1e-3)
    st_b, extra = load_checkpoint(tmp_path / "ck", lm_b, opt_b)
    assert st_b.step == 2 and st_b.flops == 20.0 and extra == {"note": "x"}
    st_b = run(lm_b, opt_b, 3, st_b)
    assert st_b.step == st_a.step == 3 and st_b.flops == 30.0
    for pa, pb in zip(lm_a.parameters(), lm_b.parameters()):
        torch.testing.assert_close(pa, pb)


def test_cosine_lr():
    assert cosine_lr(0, 100, 1.0, warmup=10) == pytest.approx(0.1)
    assert cosine_lr(9, 100, 1.0, warmup=10) == pytest.approx(1.0)
    assert cosine_lr(100, 100, 1.0, warmup=10, min_ratio=0.1) == pytest.approx(0.1)
    assert cosine_lr(55, 100, 1.0, warmup=10, min_ratio=0.0) == pytest.approx(0.5)


def test_two_process_gloo_fsdp_checkpoint_resume_is_exact(tmp_path):
    """FSDP2 on CPU (2 gloo processes): save the gathered full state, resume into a fresh sharded
    model, and the next steps match an uninterrupted run bit for bit (each rank's RNG restored)."""
    run_torchrun(HERE / "fsdp_resume_worker.py", tmp_path, timeout=240)
    rows = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for row in rows:
        assert row["sharded"].startswith("FSDP") and row["step"] == 4 and row["flops"] == 8.0
        assert row["max_diff"] == 0.0 and row["extra"] == {"note": "fsdp"}
        assert row["files"] == ["model.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json"]
