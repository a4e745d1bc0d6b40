"""The Transfusion baseline inside the LMFusion code path (``image_modules="shared"``: one dense transformer
whose text modules also process the image tokens) and the GPU path (bf16 autocast) of every variant."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tessera.errors import InputError
from tessera.models.lmfusion import LMFusionModel, load_base
from tessera.models.lmfusion_data import LMFusionData
from tessera.models.lmfusion_modules import LMFusionConfig
from tessera.models.lmfusion_objective import LMFusionLM


def _fresh(tiny_lm_dir, **cfg):
    base, tok = load_base(str(tiny_lm_dir), device="cpu", dtype=torch.float32)
    torch.manual_seed(0)
    return LMFusionModel(base, LMFusionConfig(**cfg)), tok


def _batch(model, tok, seed: int = 0):
    g = np.random.default_rng(0)
    images, labels = g.random((40, 8, 8)).astype(np.float32), np.arange(40) % 10
    data = LMFusionData(tok, images, labels, model.cfg.boi_id, model.cfg.eoi_id, caption_first=0.5)
    return data.batch(8, np.random.default_rng(seed))


def test_shared_modules_equal_separate_copies_at_init(tiny_lm_dir):
    """Image modules start as copies of the text modules, so at initialisation LMFusion's forward equals
    the dense model's: the shared path runs the same modules, attention and norms on every token."""
    sep, tok = _fresh(tiny_lm_dir, freeze_text=False)
    dense, _ = _fresh(tiny_lm_dir, freeze_text=False, image_modules="shared")
    assert dense.image_layers is None and dense.image_norm is None
    dense.load_state_dict({k: v for k, v in sep.state_dict().items() if not k.startswith(("image_layers", "image_norm"))})
    b = _batch(sep, tok)
    args = (b["tokens"], b["modality"], b["image_id"], b["attention_mask"], b["patches"], torch.full_like(b["tokens"], 300))
    with torch.no_grad():
        hs, hd = sep(*args).hidden, dense(*args).hidden
    torch.testing.assert_close(hd, hs, rtol=1e-5, atol=1e-5)
    # and once the copies differ, so do the outputs (the image rows read the image modules)
    with torch.no_grad():
        sep.image_layers[0].mlp.down_proj.weight.mul_(2.0)
        assert not torch.allclose(sep(*args).hidden, hd, atol=1e-4)


def test_shared_baseline_trains_the_whole_model_and_round_trips(tiny_lm_dir, tmp_path):
    dense, tok = _fresh(tiny_lm_dir, freeze_text=False, image_modules="shared")
    n = dense.num_params()
    assert n["trainable"] == n["image"] + n["text"]
    assert not any(k.startswith(("image_layers", "image_norm")) for k in dense.image_state_dict())
    before = dense.base.model.layers[0].self_attn.q_proj.weight.clone()
    lm = LMFusionLM(dense)
    opt = torch.optim.AdamW([p for p in lm.parameters() if p.requires_grad], lr=1e-2)
    for s in range(2):
        opt.zero_grad()
        lm(_batch(dense, tok, s), generator=torch.Generator().manual_seed(s))["loss"].backward()
        assert dense.base.model.layers[1].mlp.up_proj.weight.grad is not None
        opt.step()
    assert not torch.equal(before, dense.base.model.layers[0].self_attn.q_proj.weight)
    out = dense.save_image_modules(tmp_path / "dense", tok)
    loaded, _ = LMFusionModel.load(out, device="cpu")
    assert loaded.cfg.image_modules == "shared" and loaded.image_layers is None
    b = _batch(dense, tok, 5)
    args = (b["tokens"], b["modality"], b["image_id"], b["attention_mask"], b["patches"], torch.full_like(b["tokens"], 300))
    with torch.no_grad():
        torch.testing.assert_close(loaded(*args).hidden, dense(*args).hidden)


def test_shared_needs_the_text_modules_to_train(tiny_lm_dir):
    with pytest.raises(InputError, match="freeze_text=false"):
        _fresh(tiny_lm_dir, image_modules="shared")
    with pytest.raises(InputError, match="image_modules"):
        _fresh(tiny_lm_dir, image_modules="moe")


@pytest.mark.parametrize("cfg", [{}, {"freeze_text": False}, {"freeze_text": False, "image_modules": "shared"},
                                 {"patcher": "unet"}], ids=["lmfusion", "unfrozen", "transfusion", "unet"])
def test_forward_backward_under_bf16_autocast(tiny_lm_dir, cfg):
    """The training loop turns on bf16 autocast on CUDA; CPU autocast raises the same dtype errors."""
    model, tok = _fresh(tiny_lm_dir, **cfg)
    lm = LMFusionLM(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = lm(_batch(model, tok), generator=torch.Generator().manual_seed(0))
    out["loss"].backward()
    assert bool(torch.isfinite(out["loss"]))
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and bool(torch.isfinite(g).all()) for g in grads)


def test_understanding_images_can_stay_out_of_the_diffusion_loss(tiny_lm_dir):
    model, tok = _fresh(tiny_lm_dir)
    g = np.random.default_rng(0)
    images, labels = g.random((40, 8, 8)).astype(np.float32), np.arange(40) % 10
    with torch.no_grad():
        model.patcher.out.weight.normal_(std=0.1)  # a non-zero noise prediction
    for first, expect_zero in ((0.0, True), (1.0, False)):
        data = LMFusionData(tok, images, labels, model.cfg.boi_id, model.cfg.eoi_id, caption_first=first)
        batch = data.batch(6, np.random.default_rng(1))
        with torch.no_grad():
            losses = {flag: LMFusionLM(model, understanding_diffusion=flag)(batch, generator=torch.Generator().manual_seed(0))
                      for flag in (True, False)}
        assert float(losses[True]["image_loss"]) > 0
        if expect_zero:  # every pair is image first: no diffusion loss at all, the caption's LM loss stays
            assert float(losses[False]["image_loss"]) == 0.0
            assert float(losses[False]["text_loss"]) == float(losses[True]["text_loss"]) > 0
        else:  # caption first: nothing to leave out
            assert float(losses[False]["image_loss"]) == float(losses[True]["image_loss"])
