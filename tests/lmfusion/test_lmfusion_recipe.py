"""``tessera run lmfusion-train`` end to end on the tiny random Llama (a few steps), resume, bad input."""

from __future__ import annotations

import json

import pytest
import torch
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


def test_recipe_transfusion_baseline_from_scratch_with_tracking(tiny_lm_dir, tmp_path):
    """The from-scratch Transfusion baseline: shared modules, re-initialised base, text-only sequences from
    a corpus's training split, accuracy tracked during training, held-out text perplexity."""
    dump = tmp_path / "scratch"
    args = _args(tiny_lm_dir, dump, 4) + ["freeze_text=false", "image_modules=shared", "base_init=random",
                                          "text_fraction=0.5", "text_sources=docs:python-docs", "track_every=2",
                                          "track_per_class=1", "track_captions=4", "ppl_blocks=2",
                                          "understanding_diffusion=false"]
    r = run_cli(*args)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads((dump / "results.json").read_text())
    assert res["image_modules"] == "shared" and res["base_init"] == "random" and "text_side" not in res
    assert res["params"]["trainable"] == res["params"]["image"] + res["params"]["text"]
    assert res["text_perplexity"]["blocks"] == 2 and res["text_perplexity"]["perplexity"] > 1
    rows = [json.loads(ln) for ln in (dump / "metrics.jsonl").read_text().splitlines()]
    track = [r for r in rows if r["kind"] == "track"]
    assert [r["step"] for r in track] == [2, 4] and track[0]["flops"] < track[1]["flops"]
    assert all(0.0 <= r["generation_accuracy"] <= 1.0 and 0.0 <= r["understanding_accuracy"] <= 1.0 for r in track)
    # a re-initialised base: the saved base differs from the folder it was shaped on
    from safetensors.torch import load_file

    saved = load_file(str(dump / "image_modules" / "base" / "model.safetensors"))
    orig = load_file(str(next(tiny_lm_dir.glob("*.safetensors"))))
    k = next(k for k in orig if k.endswith("layers.0.mlp.up_proj.weight"))
    assert not torch.equal(saved[k], orig[k])


@pytest.mark.parametrize("bad,match", [("image_modules=moe", "image_modules"), ("base_init=zeros", "base_init"),
                                       ("caption_style=haiku", "caption_style"),
                                       ("image_modules=shared", "freeze_text=false")])
def test_recipe_rejects_unknown_baseline_options(tiny_lm_dir, tmp_path, bad, match):
    from tessera.errors import InputError
    from tessera.recipes import run_recipe

    with pytest.raises(InputError, match=match):
        run_recipe("lmfusion-train", None, [f"base_model={tiny_lm_dir}", bad, f"dump_dir={tmp_path / 'x'}"])
    assert not (tmp_path / "x").exists()
