"""What lets a small Transfusion model follow its caption: learned patch positions, v-prediction, and caption
dropout for classifier-free guidance (benchmarks/mixed_modal.py: without them the d64 testbed's generated
digits ignore the caption)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from mm_helpers import tiny_batch, tiny_data, tiny_lm  # noqa: E402

from tessera.models import diffusion as D  # noqa: E402
from tessera.models.decoder import patch_index  # noqa: E402
from tessera.models.modality import IMAGE, TEXT  # noqa: E402
from tessera.models.objectives import MixedModalLM  # noqa: E402
from tessera.models.sampling import generate_images  # noqa: E402


def test_patch_index_counts_within_each_run_of_image_positions():
    t, i = TEXT, IMAGE
    modality = torch.tensor([[t, t, i, i, i, t, i, i], [i, i, t, t, t, t, t, t]])
    k = patch_index(modality)
    assert k[0, 2:5].tolist() == [0, 1, 2] and k[0, 6:].tolist() == [0, 1]
    assert k[1, :2].tolist() == [0, 1]


def test_patch_positions_tell_patches_apart_and_are_trained():
    data = tiny_data("transfusion")
    batch = tiny_batch(data)
    lm = tiny_lm("transfusion", data=data, image_positions=data.image_len)
    assert lm.model.patch_pos.weight.shape == (data.image_len, 32)
    lm(batch)["loss"].backward()
    grad = lm.model.patch_pos.weight.grad
    assert grad is not None and bool((grad.abs().sum(1) > 0).all())  # every patch index was used
    no_pos = tiny_lm("transfusion", data=data)
    assert not hasattr(no_pos.model, "patch_pos")


def test_v_prediction_target_and_unknown_prediction_type():
    sched = D.make_scheduler(1000, "v_prediction")
    x0, noise = torch.randn(5, 4), torch.randn(5, 4)
    t = torch.tensor([0, 10, 300, 700, 999])
    ab = sched.alphas_cumprod[t][:, None]
    torch.testing.assert_close(D.diffusion_target(sched, x0, noise, t), ab.sqrt() * noise - (1 - ab).sqrt() * x0)
    assert D.diffusion_target(D.make_scheduler(1000), x0, noise, t) is noise
    with pytest.raises(ValueError, match="prediction_type"):
        D.make_scheduler(1000, "sample")


def test_v_prediction_trains_and_samples():
    data = tiny_data("transfusion")
    lm = tiny_lm("transfusion", data=data)
    v_lm = MixedModalLM(lm.cfg, "transfusion", prediction_type="v_prediction")
    v_lm.load_state_dict(lm.state_dict())
    batch = tiny_batch(data)
    g = torch.Generator().manual_seed(0)
    eps_loss = lm(batch, generator=g)["image_loss"]
    g = torch.Generator().manual_seed(0)
    v_loss = v_lm(batch, generator=g)["image_loss"]
    assert torch.isfinite(v_loss) and not torch.isclose(eps_loss, v_loss)  # same noise, another target
    imgs = generate_images(v_lm, data, "the number three", 2, generator=torch.Generator().manual_seed(0),
                           num_inference_steps=3, guidance_scale=3.0)
    assert imgs.shape == (2, 8, 8) and bool(((imgs >= 0) & (imgs <= 1)).all())


def test_caption_dropout_leaves_caption_first_pairs_without_caption():
    data = tiny_data("transfusion")
    data.text_fraction, data.caption_first = 0.0, 1.0
    plain = data.batch(16, np.random.default_rng(0))["tokens"]
    v = data.vocab
    assert bool((plain[:, 1] != v.boi).all())  # BOS caption BOI ...
    data.cond_dropout = 0.5
    tokens = data.batch(64, np.random.default_rng(0))["tokens"]
    dropped = tokens[:, 1] == v.boi  # BOS BOI image EOI EOS
    assert 10 < int(dropped.sum()) < 54
    L = data.image_len
    row = tokens[dropped][0].tolist()
    assert row[:2] == [v.bos, v.boi] and row[2 + L:4 + L] == [v.eoi, v.eos] and set(row[4 + L:]) == {v.pad}


def test_caption_dropout_must_be_a_probability():
    from tessera.data.mixed_modal import MixedModalData
    from tessera.errors import InputError

    d = tiny_data("transfusion")
    with pytest.raises(InputError, match="cond_dropout"):
        MixedModalData("transfusion", d.images, d.labels, d.text, cond_dropout=1.0)


def test_min_snr_weights_clip_low_noise_steps_and_weight_rows():
    t = torch.tensor([1, 100, 500, 900, 999])
    for pt in D.PREDICTION_TYPES:
        sched = D.make_scheduler(1000, pt)
        ab = sched.alphas_cumprod[t]
        snr = ab / (1 - ab)
        w = D.min_snr_weights(sched, t, 5.0)
        torch.testing.assert_close(w, snr.clamp(max=5.0) / snr)  # Min-SNR-5 for epsilon
        assert float(w[-1]) == 1.0
        assert bool(torch.isfinite(w).all()) and float(w[0]) < 0.01  # the nearly-clean step barely counts
    pred, target = torch.zeros(2, 3), torch.tensor([[1.0, 1.0, 1.0], [2.0, 2.0, 2.0]])
    assert float(D.diffusion_loss(pred, target, torch.tensor([1.0, 0.0]))) == 0.5  # row 2 weighted out
    assert float(D.diffusion_loss(pred, target)) == 2.5


def test_snr_weighting_changes_the_training_loss_not_the_reported_mse():
    data = tiny_data("transfusion")
    lm = tiny_lm("transfusion", data=data)
    w_lm = MixedModalLM(lm.cfg, "transfusion", snr_gamma=5.0)
    w_lm.load_state_dict(lm.state_dict())
    batch = tiny_batch(data)
    a, b = lm(batch, generator=torch.Generator().manual_seed(0)), w_lm(batch, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(a["image_loss"], b["image_loss"])
    assert not torch.isclose(a["model_loss"], b["model_loss"])


def test_understanding_images_leave_the_diffusion_loss_when_asked():
    data = tiny_data("transfusion")
    data.caption_first, data.text_fraction = 0.0, 0.0  # every pair image-first (captioning)
    batch = tiny_batch(data)
    assert bool(batch["understanding"].all())
    lm = tiny_lm("transfusion", data=data)
    off = MixedModalLM(lm.cfg, "transfusion", understanding_diffusion=False)
    off.load_state_dict(lm.state_dict())
    g = torch.Generator().manual_seed(0)
    out_on = lm(batch, generator=g)
    assert float(out_on["image_loss"]) > 0
    out_off = off(batch, generator=torch.Generator().manual_seed(0))
    assert float(out_off["image_loss"]) == 0.0
    torch.testing.assert_close(out_off["text_loss"], out_on["text_loss"])  # the caption's loss is untouched
    out_off["loss"].backward()
    assert all(p.grad is None or float(p.grad.abs().sum()) == 0 for p in off.model.patch_out.parameters())
    assert float(off.model.patch_in.weight.grad.abs().sum()) > 0  # the caption still reads the patches


def test_short_captions_shorten_the_sequence_and_name_the_digit():
    from mm_helpers import TEXT_DOC

    from tessera.data.mixed_modal import SHORT_CAPTION_TEMPLATES, MixedModalData, caption_for, parse_digit, text_stream
    from tessera.errors import InputError
    from tessera.recipes.mixed_modal_pretrain import Config, build_data

    for t in SHORT_CAPTION_TEMPLATES:
        assert [parse_digit(caption_for(d, t)) for d in range(10)] == list(range(10))
    data_long = tiny_data("transfusion")
    data_short = MixedModalData("transfusion", data_long.images, data_long.labels, text_stream([TEXT_DOC]), patch_size=4,
                                templates=SHORT_CAPTION_TEMPLATES)
    # BOS BOI image EOI caption EOS: 9-byte captions at most ("the seven") instead of 25 ("a handwritten digit seven")
    assert (data_short.seq_len, data_long.seq_len) == (5 + data_long.image_len + 9, 5 + data_long.image_len + 25)
    with pytest.raises(InputError, match="captions=short"):
        build_data(Config(setting="transfusion", captions="tiny"))
