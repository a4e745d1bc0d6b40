"""Training images drawn anew (random offsets and ink gain): they do not repeat, tokens and patches follow
the augmented image, and the judge learns shifted digits."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from mm_helpers import TEXT_DOC  # noqa: E402

from tessera.data.mixed_modal import MixedModalData, load_image_set, shifted, text_stream  # noqa: E402
from tessera.errors import InputError  # noqa: E402
from tessera.models import diffusion as D  # noqa: E402
from tessera.models.modality import IMAGE  # noqa: E402


def _encode(imgs):
    return np.rint(imgs.reshape(len(imgs), -1) * 16).astype(np.int64)


def _data(setting, **kw):
    imgs, labels = load_image_set("digits")
    imgs, labels = imgs[:1], labels[:1]  # one image: every pair in a batch is a version of it
    return MixedModalData(setting, imgs, labels, text_stream([TEXT_DOC]), codes=_encode(imgs), n_image_codes=17,
                          patch_size=2, text_fraction=0.0, encode=_encode if setting == "chameleon" else None, **kw)


def _versions(img, shift, gains):
    return [g * shifted(img, dy, dx) for dy in range(-shift, shift + 1)
            for dx in range(-shift, shift + 1) for g in gains]


def test_chameleon_tokens_are_the_codes_of_a_shifted_scaled_image():
    data = _data("chameleon", augment_shift=1, augment_gain=0.3)
    b = data.batch(32, np.random.default_rng(0))
    img = data.images[0]
    seen = set()
    for row in range(32):
        codes = (b["tokens"][row][b["modality"][row] == IMAGE] - data.vocab.image_offset).numpy()
        assert codes.shape == (64,) and codes.min() >= 0 and codes.max() <= 16
        seen.add(codes.tobytes())
        # some shift and gain in [0.7, 1] reproduces these codes
        grid = np.linspace(0.7, 1.0, 301)
        assert any(np.array_equal(_encode(v[None])[0], codes) for v in _versions(img, 1, grid)), row
    assert len(seen) > 8  # 32 draws of one image are not all the same


def test_transfusion_patches_follow_the_augmented_image_and_plain_data_is_unchanged():
    aug = _data("transfusion", augment_shift=1, augment_gain=0.0)
    plain = _data("transfusion")
    b = aug.batch(16, np.random.default_rng(1))
    p = plain.batch(16, np.random.default_rng(1))
    img = plain.images[0]
    want = [D.patchify(torch.from_numpy(v[None, None] * 2 - 1), 2)[0] for v in _versions(img, 1, [1.0])]
    for row in range(16):
        got = b["patches"][row][b["modality"][row] == IMAGE]
        assert any(torch.allclose(got, w) for w in want)
        assert torch.allclose(p["patches"][row][p["modality"][row] == IMAGE], want[4])  # (0, 0): the image itself
    assert torch.equal(b["tokens"], p["tokens"])  # augmentation draws after the layout: same sequences


def test_augmentation_needs_an_encoder_in_the_chameleon_setting_and_sane_values():
    imgs, labels = load_image_set("digits")
    with pytest.raises(InputError, match="encode"):
        MixedModalData("chameleon", imgs[:4], labels[:4], text_stream([TEXT_DOC]), codes=_encode(imgs[:4]),
                       n_image_codes=17, augment_shift=1)
    with pytest.raises(InputError, match="augment_gain"):
        MixedModalData("transfusion", imgs[:4], labels[:4], text_stream([TEXT_DOC]), augment_gain=1.5)


@pytest.mark.parametrize("gain", [0.0, 0.3])
def test_each_rows_patches_are_its_own_images_with_text_rows_and_dropped_captions(gain):
    """Many images in one batch, text-only rows and caption-dropped pairs: each pair row's patches come from its own
    image (every image a different constant grey level, named by its label), text-only rows have none."""
    n = 10
    imgs = np.repeat(np.linspace(0.1, 1.0, n, dtype=np.float32)[:, None, None], 8, 1).repeat(8, 2)
    labels = np.arange(n)
    data = MixedModalData("transfusion", imgs, labels, text_stream([TEXT_DOC]), patch_size=2, text_fraction=0.3,
                          caption_first=0.5, cond_dropout=0.5, augment_gain=gain)
    b = data.batch(64, np.random.default_rng(3))
    kinds = set()
    for row in range(64):
        img = b["modality"][row] == IMAGE
        got = b["patches"][row][img]
        if b["labels"][row] < 0:  # text only
            kinds.add("text")
            assert not img.any() and not b["patches"][row].any()
            continue
        level = imgs[int(b["labels"][row]), 0, 0]
        assert got.shape == (16, 4) and not b["patches"][row][~img].any()
        values = (got + 1) / 2  # back to [0, 1]: one grey level, the image's own (times the row's ink gain)
        assert torch.allclose(values, values[0, 0].expand_as(values))
        assert level * (1 - gain) - 1e-6 <= float(values[0, 0]) <= level + 1e-6
        kinds.add("dropped" if int(img.nonzero()[0]) == 2 and b["understanding"][row] == 0 else "pair")
    assert kinds == {"text", "pair", "dropped"}
