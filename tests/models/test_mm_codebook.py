"""Chameleon image tokens from a k-means codebook of 2x2 patches: 16 tokens per 8x8 digit that decode back to
a recognisable digit, usable by the recipe (digit_tokens=patches)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tessera.data.mixed_modal import PatchCodebook, load_image_set
from tessera.errors import InputError


def test_codebook_tokens_round_trip_close_to_the_digit():
    imgs, _ = load_image_set("digits")
    book = PatchCodebook.fit(imgs[:600], 64, patch=2, seed=0)
    codes = book.encode(imgs[600:700])
    assert codes.shape == (100, 16) and codes.dtype == np.int64 and 0 <= codes.min() and codes.max() < 64
    rec = book.decode(torch.from_numpy(codes))
    assert rec.shape == (100, 8, 8) and float(rec.min()) >= 0 and float(rec.max()) <= 1
    mse = book.reconstruction_mse(imgs[600:700])
    assert mse < 0.25 * float(imgs[600:700].var())  # far better than the mean image
    # an image made of codebook entries encodes to exactly those codes
    picked = np.random.default_rng(0).integers(0, 64, size=(3, 16))
    assert (book.encode(book.decode(torch.from_numpy(picked)).numpy()) == picked).all()


def test_codebook_errors_are_one_line_input_errors():
    imgs, _ = load_image_set("digits")
    with pytest.raises(InputError, match="distinct"):
        PatchCodebook.fit(np.zeros((4, 8, 8), np.float32), 16)
    with pytest.raises(InputError, match="divide"):
        PatchCodebook.fit(imgs[:10], 4, patch=3)


def test_recipe_builds_patch_tokens_for_chameleon(tmp_path):
    from tessera.recipes.mixed_modal_pretrain import Config, build_data

    train, val, tr, vi, codes_to_images, info = build_data(Config(setting="chameleon", digit_tokens="patches",
                                                                  digit_codes=64))
    assert train.image_len == 16 and train.vocab.n_image_codes == 64 and info["codebook_reconstruction_mse"] < 0.02
    batch = train.batch(8, np.random.default_rng(0), tr)
    assert int((batch["tokens"] >= train.vocab.image_offset).sum(1).max()) == 16
    assert codes_to_images(torch.from_numpy(val.codes[vi[:3]])).shape == (3, 8, 8)
    with pytest.raises(InputError, match="digit_tokens"):
        build_data(Config(setting="chameleon", digit_tokens="vq"))
