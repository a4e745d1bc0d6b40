"""benchmarks/btx.py on a very small setting: the seed gate, the expert gate, every compute-matched
method, the FLOPs accounting and the goals the issue names are all produced (about a minute)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GOALS = {"btx_seed_plateau", "btx_expert_gain", "btx_best_average", "btx_within_5pct_of_expert"}
TINY = ["--vocab", "300", "--hidden", "32", "--layers", "2", "--seq-len", "32", "--batch", "4", "--domain-blocks", "24",
        "--eval-blocks", "3", "--seed-eval-blocks", "2", "--seed-steps", "10", "--expert-steps", "2", "--ft-steps", "2",
        "--threads", "1"]


def _run(tmp_path, *extra):
    out = tmp_path / "btx.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "btx.py"), *TINY, "--work", str(tmp_path / "work"),
                           "--out", str(out), *extra], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stderr


def test_btx_benchmark_smoke(tmp_path):
    res, _ = _run(tmp_path, "--seeds", "2", "--force")
    assert set(res["goals"]) == GOALS and all({"target", "measured", "met"} <= set(g) for g in res["goals"].values())
    seed = res["tiny"]["seed"]
    assert [r["step"] for r in seed["curve"]][-1] == 10 and res["goals"]["btx_seed_plateau"]["measured"] == seed["plateau"]
    runs = res["tiny"]["runs"]
    assert [r["seed"] for r in runs] == [0, 1]
    for r in runs:
        assert set(r["heldout_perplexity"]) >= {"seed", "dense", "sparse_upcycling", "btm", "btm_branch_only", "btx"}
        f = r["flops"]  # equal training FLOPs, within one step of each method
        assert abs(f["dense"] - f["btx_total"]) <= f["dense_step"] / 2 + 1
        assert abs(f["sparse_upcycling"] - f["btx_total"]) <= f["moe_step"] / 2 + 1
        assert abs(f["btm"] - f["btx_total"]) <= 3 * f["dense_step"]
        assert len(set(r["expert_pids"])) == 3
    summ = res["tiny"]["summary"]
    assert len(summ["average_perplexity"]["btx"]["per_seed"]) == 2
    assert res["goals"]["btx_best_average"]["measured"] == float(summ["best_compute_matched"] == "btx")
    assert set(runs[0]["routing_fractions"]) == {"btx", "sparse_upcycling"}
    for png in ("btx_routing.png", "btx_routing_upcycling.png", "btx_seed.png"):
        assert (tmp_path / png).stat().st_size > 0
    assert res["machine"]["load_average_at_end"] and res["seconds_tiny"] > 0


def test_failed_seed_gate_stops_before_comparing(tmp_path):
    res, err = _run(tmp_path, "--plateau-max", "-1")  # no curve improves by less than -100%
    assert res["gates"]["seed_plateau"]["passed"] is False and "seed gate failed" in err
    assert res["tiny"]["runs"] == [] and res["goals"]["btx_best_average"]["measured"] is None
