"""Objectives, data layout, diffusion utilities, sampling, tokenizer/classifier, and the recipe."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from mm_helpers import tiny_batch, tiny_data, tiny_lm  # noqa: E402

from tessera.data.mixed_modal import BOI, BOS, EOI, EOS, PAD, caption_for, parse_digit  # noqa: E402
from tessera.models import diffusion as D  # noqa: E402
from tessera.models.modality import IMAGE, TEXT  # noqa: E402

ALL_VARIANTS = ["dense", "mot", "moe_tc", "moe_ec", "moma", "moma_mod"]


@pytest.mark.parametrize("setting", ["chameleon", "transfusion"])
def test_few_steps_lower_the_loss_for_every_variant(setting):
    data = tiny_data(setting)
    batch = tiny_batch(data, 8, seed=1)
    g = torch.Generator()
    for variant in ALL_VARIANTS:
        lm = tiny_lm(setting, variant, data)
        opt = torch.optim.AdamW(lm.parameters(), lr=1e-2)

        def loss():
            lm.eval()
            with torch.no_grad():
                v = float(lm(batch, generator=g.manual_seed(0))["model_loss"])
            lm.train()
            return v

        before = loss()
        for step in range(8):
            out = lm(batch, generator=torch.Generator().manual_seed(step))
            opt.zero_grad()
            out["loss"].backward()
            opt.step()
        after = loss()
        assert after < before * 0.9, (variant, before, after)


def test_sequence_layout_both_orders_and_targets():
    data = tiny_data("chameleon")
    toks, mod = data.pair_tokens(0, "the number one", caption_first=True)
    cap = list(b"the number one")
    assert toks[: len(cap) + 2] == [BOS, *cap, BOI] and toks[-2:] == [EOI, EOS]
    assert mod.count(IMAGE) == 64 and mod[len(cap) + 2] == IMAGE
    toks2, mod2 = data.pair_tokens(0, "the number one", caption_first=False)
    assert toks2[:2] == [BOS, BOI] and toks2[66] == EOI and mod2[2] == IMAGE and mod2[66] == TEXT
    b = tiny_batch(data, 16, seed=2)
    assert torch.equal(b["targets"][:, :-1][b["tokens"][:, 1:] != PAD], b["tokens"][:, 1:][b["tokens"][:, 1:] != PAD])
    assert bool((b["labels"] == -1).any()) and bool(b["understanding"].any())  # text-only and image-first present
    bt = tiny_batch(tiny_data("transfusion"), 16, seed=2)
    assert bool((bt["targets"][bt["target_modality"] == IMAGE] == -100).all())  # no LM target on patches
    img = bt["modality"] == IMAGE
    assert bt["patches"][img].abs().max() <= 1.0 and bt["patches"][~img].abs().max() == 0
    assert parse_digit("a picture of a seven") == 7 and parse_digit("this is a 3") == 3 and parse_digit("nothing") is None
    assert parse_digit(caption_for(4, "{word}, written by hand")) == 4


def test_diffusion_schedule_and_patches():
    s = D.make_scheduler()
    assert s.config.beta_schedule == "squaredcos_cap_v2" and s.config.num_train_timesteps == 1000
    x = torch.rand(3, 1, 8, 8)
    assert torch.equal(D.unpatchify(D.patchify(x, 2), 2, 8, 8), x)
    x0 = torch.rand(5, 4) * 2 - 1
    noise = torch.randn(5, 4)
    assert torch.allclose(D.add_noise(s, x0, noise, torch.zeros(5, dtype=torch.long)), x0, atol=0.05)
    xt = D.add_noise(s, x0, noise, torch.full((5,), 999))
    assert torch.allclose(xt, noise, atol=1e-2)  # the cosine schedule ends at (almost) pure noise
    t = D.sample_timesteps(1000, max_t=torch.tensor([500] * 1000))
    assert int(t.max()) < 500


@pytest.mark.parametrize("setting,variant", [("chameleon", "moma"), ("transfusion", "mot")])
def test_sampling_and_captioning_run(setting, variant):
    from tessera.models.classifier import DigitClassifier
    from tessera.models.sampling import caption_images, generation_accuracy

    data = tiny_data(setting)
    lm = tiny_lm(setting, variant, data)
    routing = "aux" if variant == "moma" else "batch"
    acc, imgs, labels = generation_accuracy(lm, data, DigitClassifier(), per_class=1, routing=routing,
                                            num_inference_steps=3, codes_to_images=lambda c: c.float().view(-1, 8, 8) / 16)
    assert imgs.shape == (10, 8, 8) and 0 <= float(imgs.min()) and float(imgs.max()) <= 1 and 0 <= acc <= 1
    caps = caption_images(lm, data, [0, 1, 2], routing=routing, max_new_tokens=5)
    assert len(caps) == 3 and all(isinstance(c, str) and len(c.encode()) <= 5 * 4 for c in caps)


def test_vq_tokenizer_and_classifier_learn():
    from tessera.data.mixed_modal import load_image_set
    from tessera.models.classifier import accuracy, train_digit_classifier
    from tessera.models.vq import train_vq_tokenizer

    imgs, labels = load_image_set("digits")
    clf = train_digit_classifier(imgs[:1200], labels[:1200], steps=150)
    assert accuracy(clf, imgs[1500:], labels[1500:]) > 0.8
    big = torch.nn.functional.interpolate(torch.from_numpy(imgs[:256])[:, None], size=(16, 16), mode="bilinear")[:, 0].numpy()
    vq, mse = train_vq_tokenizer(big, steps=60, n_codes=16, batch_size=32)
    codes = vq.encode(torch.from_numpy(big[:4]))
    assert codes.shape == (4, 16) and int(codes.max()) < 16
    rec = vq.decode(codes, 16, 16)
    assert rec.shape == (4, 16, 16) and mse < float(np.mean(big ** 2))  # better than predicting black


def _cfg(tmp_path, **kw):
    from tessera.recipes.mixed_modal_pretrain import Config

    base = dict(d_model=32, n_layers=2, n_heads=4, n_text_experts=2, n_image_experts=2, batch_size=4, steps=4,
                eval_every=2, eval_batches=1, ckpt_every=2, log_every=1, sample_per_class=1, sample_steps=2,
                n_caption_eval=4, classifier_steps=20, n_val_images=50, dump_dir=str(tmp_path / "run"), threads=1)
    base.update(kw)
    return Config(**base)


def test_recipe_trains_evaluates_and_resumes(tmp_path):
    from tessera.recipes.mixed_modal_pretrain import main

    out = main(_cfg(tmp_path, setting="transfusion", variant="moma_mod"))
    res = json.loads((out / "results.json").read_text())
    assert set(res["val"]) == {"batch", "aux"} and set(res["generation"]) == {"batch", "aux"}
    assert (out / "samples.png").is_file() and (out / "checkpoint" / "model.safetensors").is_file()
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["kind"] == "train"]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4]
    assert all(b["flops"] > a["flops"] > 0 for a, b in zip(train_rows, train_rows[1:]))  # cumulative FLOPs
    # resume: 4 more steps continue from the checkpoint, metrics stay one row per step
    main(_cfg(tmp_path, setting="transfusion", variant="moma_mod", steps=6, final_eval=False))
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "train"] == [1, 2, 3, 4, 5, 6]
    res = json.loads((out / "results.json").read_text())
    assert res["steps"] == 6 and res["train_flops"] == pytest.approx(train_rows[-1]["flops"] * 1.5, rel=0.02)


def test_cli_rejects_unknown_variant(tmp_path):
    from tessera_testing import run_cli

    r = run_cli("run", "mixed-modal-pretrain", "variant=nope", f"dump_dir={tmp_path / 'x'}")
    assert r.returncode == 2 and "unknown variant" in r.stderr and not (tmp_path / "x").exists()


def test_recipe_stops_at_the_first_evaluation_that_reaches_every_target(tmp_path):
    from tessera.recipes.mixed_modal_pretrain import main

    # reachable targets (losses start near 5-6 nats): stop at the first evaluation after step 0, step 2 of 8
    out = main(_cfg(tmp_path, steps=8, stop_text_loss=50.0, stop_image_loss=50.0, stop_model_loss=50.0, final_eval=False))
    res = json.loads((out / "results.json").read_text())
    assert res["steps"] == 2 and res["stopped_at_match"] is True
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in rows) == 2 and (out / "checkpoint" / "model.safetensors").is_file()
    # one unreachable target keeps it going to the end
    out = main(_cfg(tmp_path, steps=4, stop_text_loss=50.0, stop_image_loss=1e-6, final_eval=False,
                    dump_dir=str(tmp_path / "run2")))
    res = json.loads((out / "results.json").read_text())
    assert res["steps"] == 4 and res["stopped_at_match"] is False


def test_resume_keeps_the_optimizer_implementation_this_run_chose(tmp_path):
    """A checkpoint's param groups carry the saving run's AdamW flags (fused on plain tensors); a resumed run keeps its own
    (FSDP2's DTensors take the default implementation)."""
    from dataclasses import replace

    from tessera.recipes.mixed_modal_pretrain import _build_model, _resume, build_data, main
    from tessera.train import init_distributed

    cfg = _cfg(tmp_path, steps=2, final_eval=False)
    out = main(cfg)
    info = init_distributed("cpu")
    _, model, _, opt = _build_model(cfg, info, build_data(cfg)[0])
    assert all(g["fused"] for g in opt.param_groups)  # plain tensors: the fused kernel, as in the saved run
    for g in opt.param_groups:
        g["fused"] = None  # what a run on DTensors chooses
    state = _resume(replace(cfg, resume=True), info, model, opt, out)
    assert state.step == 2 and all(g["fused"] is None for g in opt.param_groups)
    assert len(opt.state) > 0  # the moments were loaded
