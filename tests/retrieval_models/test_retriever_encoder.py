"""Retriever construction: bidirectional attention in padded batches, prompt-free pooling, save/load."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tessera.errors import InputError, ModelNotFoundError
from tessera.retrieval.encoder import (
    build_retriever,
    check_bidirectional,
    format_prompt,
    is_bidirectional,
    prompt_boundary_ok,
    token_states,
)

LONG_A = "the river runs past the old mill and into the valley"
LONG_B = "the river runs past the old mill and into the forest"  # differs only in the last word
SHORT = "a mill"


@pytest.fixture(scope="module")
def bidi(tiny_lm_dir):
    return build_retriever(str(tiny_lm_dir), max_seq_length=64, device="cpu")


@pytest.fixture(scope="module")
def causal(tiny_lm_dir):
    return build_retriever(str(tiny_lm_dir), bidirectional=False, max_seq_length=64, device="cpu")


def _first_diff(model):
    # a padded batch: SHORT forces padding of the two long rows' neighbours
    h, mask = token_states(model, [LONG_A, SHORT, LONG_B])
    assert mask[1].sum() < mask[0].sum()  # really padded
    n = int(mask[0].sum())
    same = [torch.allclose(h[0, t], h[2, t], atol=1e-6) for t in range(n)]
    return same


def test_bidirectional_in_a_padded_batch(bidi):
    same = _first_diff(bidi)
    assert not same[0], "changing the last word must change the first token's state"
    assert not any(same)
    assert is_bidirectional(bidi) and check_bidirectional(bidi)
    e = bidi.encode_document([LONG_A, SHORT, LONG_B])
    assert not np.allclose(e[0], e[2])


def test_causal_mode_is_causal(causal):
    same = _first_diff(causal)
    assert all(same[:-1]) and not same[-1], "only the changed last token may differ"
    assert not is_bidirectional(causal) and not check_bidirectional(causal)


def test_padding_does_not_leak(bidi):
    alone = bidi.encode_document([SHORT])
    batched = bidi.encode_document([LONG_A, SHORT])
    np.testing.assert_allclose(alone[0], batched[1], atol=1e-5)


def test_pooling_excludes_the_prompt(bidi):
    prompt = bidi.prompts["query"]
    assert prompt.startswith("<|user|>\n") and prompt.endswith("<|embed|>\n")
    assert prompt_boundary_ok(bidi[0].tokenizer, prompt)
    texts = ["old mill river", LONG_A]
    got = bidi.encode_query(texts)
    h, mask = token_states(bidi, texts, prompt=prompt)
    n_prompt = len(bidi[0].tokenizer(prompt, add_special_tokens=False)["input_ids"])
    for i in range(2):
        n = int(mask[i].sum())
        want = h[i, n_prompt:n].mean(0)
        with_prompt = h[i, :n].mean(0)
        want, with_prompt = (torch.nn.functional.normalize(v, dim=0).numpy() for v in (want, with_prompt))
        np.testing.assert_allclose(got[i], want, atol=1e-5)
        assert not np.allclose(got[i], with_prompt, atol=1e-3)
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_last_token_pooling(tiny_lm_dir):
    model = build_retriever(str(tiny_lm_dir), pooling="last", prompt_style="drama", max_seq_length=64, device="cpu")
    assert model.prompts == {"query": "Query: ", "document": ""}
    got = model.encode_document([LONG_A, SHORT])
    h, mask = token_states(model, [LONG_A, SHORT])
    for i in range(2):
        last = h[i, int(mask[i].sum()) - 1]
        np.testing.assert_allclose(got[i], torch.nn.functional.normalize(last, dim=0).numpy(), atol=1e-5)


def test_save_and_load_give_identical_embeddings(bidi, tmp_path):
    from sentence_transformers import SentenceTransformer

    bidi.truncate_dim = 16
    try:
        bidi.save(str(tmp_path / "r"))
        q1, d1 = bidi.encode_query([LONG_A, SHORT]), bidi.encode_document([LONG_B, SHORT])
    finally:
        bidi.truncate_dim = None
    again = SentenceTransformer(str(tmp_path / "r"), device="cpu")
    assert again.prompts == bidi.prompts and again.truncate_dim == 16 and again.max_seq_length == 64
    assert check_bidirectional(again)
    q2, d2 = again.encode_query([LONG_A, SHORT]), again.encode_document([LONG_B, SHORT])
    assert q2.shape == (2, 16)
    np.testing.assert_array_equal(q1, q2)
    np.testing.assert_array_equal(d1, d2)


def test_encoder_backbone_and_prompt_styles():
    model = build_retriever(device="cpu", max_seq_length=128)  # embedded MiniLM
    assert model.prompts["query"] == "" and model.max_seq_length == 128
    e = model.encode_query(["what is a river"])
    assert e.shape == (1, 384) and abs(float(np.linalg.norm(e)) - 1) < 1e-5
    assert format_prompt("reasonir", "Find X") == "<|user|>\nFind X\n<|embed|>\n"
    assert format_prompt("reasonir", "", "document") == "<|embed|>\n"
    assert format_prompt("drama", "ignored", "document") == ""


def test_bad_input(tiny_lm_dir, tmp_path):
    with pytest.raises(InputError, match="pooling"):
        build_retriever(str(tiny_lm_dir), pooling="max")
    with pytest.raises(InputError, match="matryoshka_dims"):
        build_retriever(str(tiny_lm_dir), matryoshka_dims=[64, 16])
    with pytest.raises(InputError, match="prompt style"):
        format_prompt("gritty")
    with pytest.raises(ModelNotFoundError):
        build_retriever(str(tmp_path / "nope"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelNotFoundError, match="config.json"):
        build_retriever(str(empty))
