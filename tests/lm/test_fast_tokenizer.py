"""FastTokenizer answers like the transformers tokenizer of the same folder (the embedded SmolLM2's)."""

from __future__ import annotations

import pytest

CONVERSATIONS = [
    [{"role": "user", "content": "hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What's 2+2?\n\nThanks!"},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "émoji 🎉 <|im_end|> tabs\t and  spaces "}],
]
TEXTS = ["hello  world\n x", " leading space", "<|im_start|>x<|im_end|>", "naïve café 日本語", "", "def f(x=1):\n    return x"]


@pytest.fixture(scope="module")
def pair(embedded_lm_dir):
    from transformers import AutoTokenizer

    from tessera.lm.fast_tokenizer import FastTokenizer

    return FastTokenizer(embedded_lm_dir), AutoTokenizer.from_pretrained(embedded_lm_dir)


@pytest.mark.parametrize("conv", CONVERSATIONS)
@pytest.mark.parametrize("gen", [True, False])
def test_chat_template_matches_transformers(pair, conv, gen):
    fast, hf = pair
    want = hf.apply_chat_template(conv, add_generation_prompt=gen, tokenize=True)
    want = list(want["input_ids"] if hasattr(want, "keys") else want)
    assert fast.apply_chat_template(conv, add_generation_prompt=gen, tokenize=True) == want
    assert fast.apply_chat_template(conv, add_generation_prompt=gen, tokenize=False) == \
        hf.apply_chat_template(conv, add_generation_prompt=gen, tokenize=False)


@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_match_transformers(pair, text):
    fast, hf = pair
    for special in (True, False):
        ids = fast(text, add_special_tokens=special)["input_ids"]
        assert ids == hf(text, add_special_tokens=special)["input_ids"]
        for skip in (True, False):
            assert fast.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)


def test_special_tokens_and_fallback(pair):
    fast, hf = pair
    for name in ("eos_token_id", "pad_token_id", "bos_token_id", "eos_token", "pad_token"):
        assert getattr(fast, name) == getattr(hf, name), name
    assert len(fast) == len(hf)
    assert fast._hf is None or fast._hf is not hf
    # anything else is answered by the transformers tokenizer, loaded on demand
    assert fast.convert_ids_to_tokens([1, 2]) == hf.convert_ids_to_tokens([1, 2])
    enc = fast(["a b", "c"], add_special_tokens=False)  # batches go to transformers too
    assert enc["input_ids"] == hf(["a b", "c"], add_special_tokens=False)["input_ids"]
