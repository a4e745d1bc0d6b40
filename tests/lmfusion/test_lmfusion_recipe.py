"""``tessera run lmfusion-train`` end to end on the tiny random Llama (a few steps), resume, bad input."""

from __future__ import annotations

import json

import pytest
from tessera_testing import run_cli


def _args(tiny_lm_dir, dump, steps: int):
    return ["run", "lmfusion-train", f"base_model={tiny_lm_dir}", f"steps={steps}", "batch_size=4", "eval_every=2",
            "eval_batches=1", "sample_per_class=1", "sample_steps=2", "n_caption_eval=4", "caption_tokens=2",
            "classifier_steps=5", "n_val_images=50", "text_check_tokens=32", "threads=1", f"dump_dir={dump}"]


def test_recipe_trains_saves_and_resumes(tiny_lm_dir, tmp_path):
    dump = tmp_path / "run"
    r = run_cli(*_args(tiny_lm_dir, dump, 3))
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads((dump / "results.json").read_text())
    assert res["text_side"]["bit_identical"] is True and res["text_side"]["max_abs_logit_diff"] == 0.0
    assert res["params"]["trainable"] == res["params"]["image"]
    assert 0.0 <= res["generation_accuracy"] <= 1.0 and 0.0 <= res["understanding_accuracy"] <= 1.0
    assert res["train_flops"] > 0 and res["steps"] == 3
    assert (dump / "image_modules" / "lmfusion_image.safetensors").is_file() and (dump / "samples.png").is_file()
    rows = [json.loads(ln) for ln in (dump / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [0, 2, 3]
    assert evals[0]["flops"] == 0 < evals[1]["flops"] < evals[2]["flops"]
    # resume (in process): a longer run continues from the checkpoint at step 3
    from tessera.recipes import run_recipe

    run_recipe("lmfusion-train", None, _args(tiny_lm_dir, dump, 4)[2:] + ["final_eval=false"])
    res2 = json.loads((dump / "results.json").read_text())
    assert res2["steps"] == 4 and res2["train_flops"] > res["train_flops"]
    assert res2["train_tokens"] == res["train_tokens"] * 4 // 3


def test_recipe_bad_input(tiny_lm_dir, tmp_path):
    from tessera.errors import InputError, ModelNotFoundError
    from tessera.recipes import run_recipe

    with pytest.raises(InputError, match="patcher"):
        run_recipe("lmfusion-train", None, [f"base_model={tiny_lm_dir}", "patcher=vae", f"dump_dir={tmp_path / 'x'}"])
    with pytest.raises(InputError, match="sampler"):
        run_recipe("lmfusion-train", None, [f"base_model={tiny_lm_dir}", "sampler=euler", f"dump_dir={tmp_path / 'y'}"])
    with pytest.raises(ModelNotFoundError):
        run_recipe("lmfusion-train", None, [f"base_model={tmp_path / 'missing'}", f"dump_dir={tmp_path / 'z'}"])
