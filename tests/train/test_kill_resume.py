"""Long jobs survive ``kill -9``: a child process is killed at a random moment of its run, the same
command is run again, and the result equals an uninterrupted run's (bit-exact on CPU): the
``metrics.jsonl`` rows (wall times aside), ``results.json`` and the final weights."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tessera.recipes import run_recipe
from tessera_testing import kill_midway, lines_at_least

WALL_KEYS = ("step_s", "median_step_s", "seconds", "wall_s", "train_seconds")


def _no_wall(x):
    if isinstance(x, dict):
        return {k: _no_wall(v) for k, v in x.items() if k not in WALL_KEYS}
    if isinstance(x, list):
        return [_no_wall(v) for v in x]
    return x


def _rows(dump: Path) -> list[dict]:
    text = (dump / "metrics.jsonl").read_text()
    assert text.endswith("\n")
    return [_no_wall(json.loads(ln)) for ln in text.splitlines()]


def assert_same_run(ref: Path, run: Path, weights: str) -> None:
    rows_ref, rows_run = _rows(ref), _rows(run)
    keyed = [(r["kind"], r["step"], r.get("routing")) for r in rows_run]
    assert len(keyed) == len(set(keyed)), "duplicated metric rows"
    assert rows_run == rows_ref
    res_ref, res_run = (_no_wall(json.loads((d / "results.json").read_text())) for d in (ref, run))
    assert res_run == res_ref
    w_ref, w_run = load_file(str(ref / weights)), load_file(str(run / weights))
    assert w_ref.keys() == w_run.keys()
    for k in w_ref:
        assert (w_ref[k] == w_run[k]).all(), k
    assert not [p.name for p in run.iterdir() if p.name.startswith(".")], "temporary files left behind"


def killed_then_rerun(recipe: str, args: list[str], dump: Path, lo: int, hi: int, seed: int) -> None:
    at = random.Random(seed).randint(lo, hi)  # a metrics row in the middle of the run
    kill_midway(["run", recipe, *args, f"dump_dir={dump}"], lines_at_least(dump / "metrics.jsonl", at))
    assert not (dump / "results.json").exists()
    run_recipe(recipe, None, [*args, f"dump_dir={dump}"])


def test_mixed_modal_pretrain_survives_kill_9(tmp_path):
    args = ["setting=transfusion", "variant=mot", "d_model=32", "n_layers=2", "n_heads=4", "batch_size=4", "steps=40",
            "eval_every=10", "eval_batches=1", "ckpt_every=6", "log_every=1", "sample_per_class=1", "sample_steps=2",
            "n_caption_eval=4", "classifier_steps=20", "n_val_images=50", "threads=1", "ema_decay=0.9"]
    run_recipe("mixed-modal-pretrain", None, [*args, f"dump_dir={tmp_path / 'ref'}"])
    killed_then_rerun("mixed-modal-pretrain", args, tmp_path / "run", 8, 38, seed=1)
    assert_same_run(tmp_path / "ref", tmp_path / "run", "checkpoint/model.safetensors")
    assert_same_run(tmp_path / "ref", tmp_path / "run", "checkpoint/averaged.safetensors")  # the weight EMA too


def test_lmfusion_train_survives_kill_9(tiny_lm_dir, tmp_path):
    args = [f"base_model={tiny_lm_dir}", "steps=24", "batch_size=4", "eval_every=8", "eval_batches=1", "ckpt_every=5",
            "log_every=1", "sample_per_class=1", "sample_steps=2", "n_caption_eval=4", "caption_tokens=2",
            "classifier_steps=5", "n_val_images=50", "text_check_tokens=32", "threads=1"]
    run_recipe("lmfusion-train", None, [*args, f"dump_dir={tmp_path / 'ref'}"])
    killed_then_rerun("lmfusion-train", args, tmp_path / "run", 6, 24, seed=2)
    assert_same_run(tmp_path / "ref", tmp_path / "run", "checkpoint/model.safetensors")


@pytest.mark.parametrize("torn", [b'{"kind": "train", "st', b"\xff\xfe garbage"])
def test_resume_drops_torn_and_late_metric_rows(tmp_path, torn):
    from tessera.models.scoring import drop_metrics_after

    p = tmp_path / "metrics.jsonl"
    rows = [{"kind": "train", "step": s} for s in range(1, 8)]
    p.write_bytes(b"".join(json.dumps(r).encode() + b"\n" for r in rows) + torn)
    drop_metrics_after(p, 5)
    assert [json.loads(ln)["step"] for ln in p.read_text().splitlines()] == [1, 2, 3, 4, 5]


def test_pit_survives_kill_9(tmp_path):
    """Killed while training schedule 2: the rerun reuses schedule 1 and retrains schedule 2 from the start."""
    args = ["n_people=8", "tiny_hidden=32", "tiny_layers=1", "tiny_vocab=400", "schedules=[1,2]", "doc_epochs=1",
            "qa_epochs=1", "keep_qa=4", "batch_size=16", "eval_train_qa=0", "max_new_tokens=6", "references=false", "threads=1"]
    run_recipe("pit", None, [*args, f"dump_dir={tmp_path / 'ref'}"])
    per_schedule = [sum(r.get("schedule") == n for r in _rows(tmp_path / "ref")) for n in (1, 2)]
    assert per_schedule[1] >= 3
    dump = tmp_path / "run"
    # killed once schedule 2 has logged a row or two: those rows must not come back twice
    at = per_schedule[0] + random.Random(3).randint(1, per_schedule[1] - 1)
    kill_midway(["run", "pit", *args, f"dump_dir={dump}"], lines_at_least(dump / "metrics.jsonl", at))
    assert (dump / "schedules.jsonl").read_text().count("\n") == 1
    assert not (dump / "results.json").exists()
    run_recipe("pit", None, [*args, f"dump_dir={dump}"])
    rows = sorted(json.dumps(r, sort_keys=True) for r in _rows(dump))
    assert rows == sorted(json.dumps(r, sort_keys=True) for r in _rows(tmp_path / "ref"))  # none lost, none twice
    res = {d: _no_wall(json.loads((tmp_path / d / "results.json").read_text())) for d in ("ref", "run")}
    for r in res["ref"], res["run"]:
        r["config"].pop("dump_dir")
    assert res["run"] == res["ref"]
    assert not list(dump.glob("pit-*"))
