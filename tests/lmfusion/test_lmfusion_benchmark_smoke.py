"""``benchmarks/lmfusion.py`` end to end at toy size: text pretraining, the from-scratch baseline and LMFusion
through the recipe, the comparison, gates and goals in the JSON, the figure."""

from __future__ import annotations

import json
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


def test_lmfusion_benchmark_smoke(tmp_path):
    sys.path.insert(0, str(BENCH))
    try:
        import lmfusion as B
    finally:
        sys.path.remove(str(BENCH))
    out = tmp_path / "lmfusion.json"
    argv = ["--quick", "--text-hidden", "32", "--text-layers", "1", "--text-vocab", "512", "--text-steps", "6",
            "--steps-baseline", "4", "--steps-lmfusion", "4", "--track-every", "2", "--batch-size", "4", "--per-class", "1", "--track-per-class", "1",
            "--track-captions", "4", "--sample-steps", "2", "--classifier-steps", "5", "--ppl-blocks", "4", "--workers", "1",
            "--work-dir", str(tmp_path / "work"), "--out", str(out)]
    res = B.main(argv)
    on_disk = json.loads(out.read_text())
    assert on_disk["goals"] == res["goals"]
    assert set(res["goals"]) == {"text_model_plateau", "baseline_generation_gate", "baseline_understanding_gate",
                                 "lmfusion_flops_fraction_to_match_generation", "lmfusion_understanding",
                                 "lmfusion_text_ppl_ratio", "lmfusion_text_ppl_vs_scratch"}
    assert all(set(g) == {"target", "measured", "met"} for g in res["goals"].values())
    text = res["text_model"]
    assert text["config"]["steps"] == 6 and len(text["curve"]) >= 2 and text["heldout_perplexity"] > 1
    base, lmf = res["runs"]["baseline_s0"], res["runs"]["lmfusion_s0"]
    assert [r["step"] for r in base["track"]] == [2, 4] == [r["step"] for r in lmf["track"]]
    # frozen text: LMFusion's held-out perplexity is the frozen model's exactly; the baseline trained its own text
    assert res["goals"]["lmfusion_text_ppl_ratio"]["measured"] == 1.0 and res["goals"]["lmfusion_text_ppl_ratio"]["met"]
    assert lmf["text_side"]["bit_identical"] is True and "text_side" not in base
    # only the image stage trains in LMFusion, so its backward is cheaper per step than the dense baseline's
    cmp = res["comparison"]["per_seed"][0]
    assert 0 < cmp["flops_per_step_ratio"] < 1
    assert set(res["caption_study"]) == {"baseline", "lmfusion"}
    assert out.with_suffix(".png").is_file()
    # reuse: a second invocation trains nothing and reports the same runs
    again = B.main(argv + ["--reuse"])
    assert again["runs"]["lmfusion_s0"]["train_flops"] == lmf["train_flops"]


def test_gpu_script_smoke(tmp_path):
    """benchmarks/gpu/lmfusion.sh --smoke: the GPU script's path (the embedded SmolLM2 as the given text model,
    here its first 2 layers on CPU) through the benchmark to its JSON."""
    import subprocess

    proc = subprocess.run(["bash", str(BENCH / "gpu" / "lmfusion.sh"), "--smoke", str(tmp_path)], capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((tmp_path / "lmfusion_gpu.json").read_text())
    assert res["text_model"]["model_dir"] == "default" and res["text_model"]["plateau"] is None
    assert res["runs"]["lmfusion_s0"]["text_side"]["bit_identical"] is True
    assert res["goals"]["lmfusion_text_ppl_ratio"]["measured"] == 1.0
