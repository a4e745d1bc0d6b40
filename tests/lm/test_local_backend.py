"""Batched local generation (left padding) against batch-1 decoding, on a tiny random-weight Llama."""

from __future__ import annotations

import torch

from tessera.lm.local import left_pad
from tessera.lm.local_backend import LocalBackend

CONVS = [[{"role": "user", "content": t}] for t in ("hi", "a much longer question about retrieval and reasoning here", "why?")]


def test_left_pad():
    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_batched_greedy_equals_batch1_stream(tiny_lm):
    b = LocalBackend(tiny_lm, batch_size=3)
    batched = b.chat(CONVS, max_new_tokens=8)
    for conv, g in zip(CONVS, batched):
        single = tiny_lm.generate(tiny_lm.encode_chat(conv), max_new_tokens=8)  # the original batch-1 loop
        assert g.text == single
        assert g.ok and g.prompt_tokens == tiny_lm.encode_chat(conv).shape[1]
    assert b.stats.conversations == 3 and b.stats.calls == 1 and b.stats.new_tokens == sum(g.new_tokens for g in batched)


def test_prefix_seed_and_stop_when(tiny_lm):
    b = LocalBackend(tiny_lm, batch_size=2)
    g = b.chat(CONVS[:2], max_new_tokens=6, prefix='{"query": "')
    assert all(x.text.startswith('{"query": "') for x in g)
    s1 = b.chat(CONVS[:2], max_new_tokens=6, temperature=1.0, seed=3)
    s2 = b.chat(CONVS[:2], max_new_tokens=6, temperature=1.0, seed=3)
    assert [x.text for x in s1] == [x.text for x in s2]
    seen = []

    def stop(text):
        seen.append(text)
        return True

    g = b.chat(CONVS[:1], max_new_tokens=20, stop_when=stop)
    assert seen and g[0].new_tokens <= 4 and g[0].finish_reason == "stop"


def test_next_token_logprobs_batched_equals_single(tiny_lm):
    b = LocalBackend(tiny_lm, batch_size=3)
    batched = b.next_token_logprobs(CONVS, ["Yes", "No"], prefix="Answer:")
    for conv, lp in zip(CONVS, batched):
        ids = torch.tensor([b.encode(conv, "Answer:")])
        with torch.inference_mode():
            ref = torch.log_softmax(tiny_lm.model(input_ids=ids).logits[0, -1].float(), -1)
        for c, tids in b.candidate_token_ids(["Yes", "No"]).items():
            assert abs(lp[c] - float(ref[tids].logsumexp(0))) < 1e-4


def test_too_long_prompt_is_recorded_not_raised(tiny_lm):
    b = LocalBackend(tiny_lm, batch_size=2)
    long = [{"role": "user", "content": "word " * 2000}]
    g = b.chat([long, CONVS[0]], max_new_tokens=4, batch_size=1)
    assert g[0].error and "context" in g[0].error and g[0].finish_reason == "error"
    assert g[1].ok
