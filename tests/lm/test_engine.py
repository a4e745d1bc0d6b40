"""tessera's decoding/scoring engine (static KV cache, shared prefixes, compaction) against transformers' forward.

Unit tests run a tiny random-weight Llama; the ``integration`` ones check that greedy outputs of
the embedded SmolLM2 stay token-identical to ``model.generate``.
"""

from __future__ import annotations

import pytest
import torch

from tessera.lm import engine as E
from tessera.lm.local import LocalLM

TEMPLATE = list(range(1000, 1040))  # a shared "instruction" prefix


def rows_with_shared_prefix(seed: int = 0, n: int = 5) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        tail = torch.randint(2000, 9000, (int(torch.randint(3, 30, (1,), generator=g)),), generator=g).tolist()
        rows.append(TEMPLATE + tail)
    rows.append(list(range(3000, 3011)))  # one row that shares nothing
    return rows


def hf_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=torch.tensor([ids])).logits[0].float()


def test_supports_llama_and_refuses_other_architectures(tiny_lm):
    from transformers import GPT2Config, GPT2LMHeadModel

    assert E.supports(tiny_lm.model) and tiny_lm.engine == "tessera"
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=len(tiny_lm.tokenizer)))
    other = LocalLM(gpt2, tiny_lm.tokenizer)
    assert not E.supports(gpt2) and other.engine == "hf"
    with pytest.raises(ValueError, match="engine='hf'"):
        other.generate_batch([[1, 2, 3]], max_new_tokens=2, engine="tessera")
    with pytest.raises(ValueError, match="unknown engine"):
        tiny_lm.generate_batch([[1, 2, 3]], max_new_tokens=2, engine="vllm")
    # the fallback still generates
    assert len(other.generate_batch([[1, 2, 3]], max_new_tokens=3)[0].token_ids) <= 3


def test_prefill_with_anchor_and_holes_equals_unpadded_forward(tiny_lm):
    """Rows laid out as [anchor prefix | hole | suffix] see exactly their own tokens."""
    model = tiny_lm.model
    rows = rows_with_shared_prefix()
    anchor = rows[0]
    shared = E.shared_lengths(rows, anchor, 1)
    assert shared[0] == len(anchor) - 1 and shared[-1] == 0 and all(s == len(TEMPLATE) for s in shared[1:-1])
    anc = E.anchor_kv(model, anchor[:max(shared)])
    pre = E.prefill_rows(model, rows, shared, anc, extra_capacity=0, logits_last=3, pad_id=0)
    for r, row in enumerate(rows):
        ref = hf_logits(model, row)
        k = min(3, len(row) - shared[r])  # columns that hold this row's own tokens
        torch.testing.assert_close(pre.logits[r, -k:].float(), ref[-k:], atol=1e-4, rtol=1e-4)
    assert pre.computed_tokens == sum(len(r) - s for r, s in zip(rows, shared))
    assert pre.next_pos.tolist() == [len(r) for r in rows]


@pytest.mark.parametrize("max_new", [1, 12])
def test_generate_batch_greedy_equals_model_generate(tiny_lm, max_new):
    rows = rows_with_shared_prefix(1)
    ours = tiny_lm.generate_batch(rows, max_new_tokens=max_new, engine="tessera")
    ref = tiny_lm.generate_batch(rows, max_new_tokens=max_new, engine="hf")
    assert [o.token_ids for o in ours] == [r.token_ids for r in ref]
    assert [o.stop_reason for o in ours] == [r.stop_reason for r in ref]
    for row, o in zip(rows, ours):  # and each row equals its own batch-1 decoding
        alone = tiny_lm.generate_batch([row], max_new_tokens=max_new, engine="hf")[0]
        assert o.token_ids == alone.token_ids


def test_rows_that_stop_early_leave_the_batch_without_changing_the_others(tiny_lm, monkeypatch):
    rows = rows_with_shared_prefix(2)
    kept = []
    real_keep = E.KVBuffer.keep

    def spy(self, live):
        kept.append(len(live))
        return real_keep(self, live)

    monkeypatch.setattr(E.KVBuffer, "keep", spy)
    full = tiny_lm.generate_batch(rows, max_new_tokens=16, engine="hf")
    stops = {0, 1, 2}  # these rows stop after 4 tokens (stop_when), the others run to 16
    stop_texts = {tiny_lm.tokenizer.decode(full[i].token_ids[:4], skip_special_tokens=True) for i in stops}
    out = tiny_lm.generate_batch(rows, max_new_tokens=16, stop_check_every=4, engine="tessera",
                                 stop_when=lambda text: text in stop_texts)
    for i, (o, f) in enumerate(zip(out, full)):
        if i in stops:
            assert o.stop_reason == "stop_when" and o.token_ids == f.token_ids[:4]
        elif tiny_lm.tokenizer.decode(f.token_ids[:4], skip_special_tokens=True) not in stop_texts:
            assert o.token_ids == f.token_ids and o.stop_reason == f.stop_reason
    assert kept and kept[0] <= len(rows) - len(stops)  # the finished rows were compacted out


def test_stream_engines_agree_and_report_stats(tiny_lm):
    from tessera.lm.local import GenerationStats

    ids = tiny_lm.encode_chat([{"role": "user", "content": "Tell me about retrieval."}])
    st = GenerationStats()
    a = "".join(tiny_lm.stream(ids, max_new_tokens=10, stats=st, engine="tessera"))
    b = "".join(tiny_lm.stream(ids, max_new_tokens=10, engine="hf"))
    assert a == b and st.new_tokens > 0 and st.time_to_first_token_s > 0
    s1 = "".join(tiny_lm.stream(ids, max_new_tokens=8, temperature=1.0, seed=4))
    s2 = "".join(tiny_lm.stream(ids, max_new_tokens=8, temperature=1.0, seed=4))
    assert s1 == s2


def test_repetition_penalty_matches_transformers_for_one_row(tiny_lm):
    row = rows_with_shared_prefix(3)[0]
    a = tiny_lm.generate_batch([row], max_new_tokens=10, repetition_penalty=1.3, engine="tessera")
    b = tiny_lm.generate_batch([row], max_new_tokens=10, repetition_penalty=1.3, engine="hf")
    plain = tiny_lm.generate_batch([row], max_new_tokens=10, engine="tessera")
    assert a[0].token_ids == b[0].token_ids
    assert len(set(a[0].token_ids)) >= len(set(plain[0].token_ids))


def test_score_reuses_the_anchor_and_equals_the_padded_forward(tiny_lm):
    ctx = [list(range(2000 + 10 * i, 2000 + 10 * i + 7)) for i in range(6)]  # six "sentences"
    head, stmt = list(range(1000, 1020)), [5000, 5001, 5002, 5003]
    everything = set(range(6))

    def prompt(keep):
        return head + [t for i in sorted(keep) for t in ctx[i]] + stmt

    rows = [(prompt(everything), 4)] + [(prompt(everything - {i}), 4) for i in range(6)] + [(prompt({i}), 4) for i in range(6)]
    ours = tiny_lm.score(rows, batch_size=4, engine="tessera")
    ref = tiny_lm.score(rows, batch_size=4, engine="hf")
    for a, b, (seq, n) in zip(ours, ref, rows):
        assert len(a) == n
        assert max(abs(x - y) for x, y in zip(a, b)) < 1e-4
        direct = torch.log_softmax(hf_logits(tiny_lm.model, seq)[-n - 1:-1], -1)
        assert abs(sum(a) - float(direct.gather(-1, torch.tensor(seq[-n:])[:, None]).sum())) < 1e-3
    stats = tiny_lm.last_score_stats
    assert stats["computed_tokens"] < 0.6 * stats["tokens"]
    with pytest.raises(ValueError, match="cannot score"):
        tiny_lm.score([([1, 2], 2)], engine="tessera")


def test_last_logprobs_equal_transformers(tiny_lm):
    rows = rows_with_shared_prefix(4)
    ours = tiny_lm.batched_last_logprobs(rows, engine="tessera")
    ref = tiny_lm.batched_last_logprobs(rows, engine="hf")
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


def test_engine_runs_under_bf16_autocast(tiny_lm):
    rows = rows_with_shared_prefix(5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = tiny_lm.generate_batch(rows, max_new_tokens=4, engine="tessera")
        scores = tiny_lm.score([(rows[0], 3), (rows[1], 2)], engine="tessera")
    assert len(out) == len(rows) and all(len(o.token_ids) <= 4 for o in out)
    assert all(torch.isfinite(torch.tensor(s)).all() for s in scores)


@pytest.mark.integration
def test_embedded_greedy_outputs_identical_to_model_generate(embedded_lm):
    lm = embedded_lm
    convs = [[{"role": "user", "content": q}] for q in (
        "What is a Python decorator?", "Name three uses of a hash table.",
        "Explain in one sentence what a retriever does in retrieval-augmented generation.")]
    prompts = [lm.encode_chat(c)[0].tolist() for c in convs]
    ours = lm.generate_batch(prompts, max_new_tokens=24, engine="tessera")
    ref = lm.generate_batch(prompts, max_new_tokens=24, engine="hf")
    assert [o.token_ids for o in ours] == [r.token_ids for r in ref]
    ids = torch.tensor([prompts[0]])
    assert "".join(lm.stream(ids, max_new_tokens=24, engine="tessera")) == "".join(lm.stream(ids, max_new_tokens=24, engine="hf"))
    rows = [(p + r.token_ids, len(r.token_ids)) for p, r in zip(prompts, ref) if len(r.token_ids) > 1]
    for a, b in zip(lm.score(rows, engine="tessera"), lm.score(rows, engine="hf")):
        assert max(abs(x - y) for x, y in zip(a, b)) < 1e-3


def test_ngram_index_drafts_the_most_recent_continuation():
    idx = E.NgramIndex([1, 2, 3, 4, 1, 2, 5, 6, 9, 1, 2], n_max=3)
    assert idx.draft(3) == [5, 6, 9]  # (9, 1, 2) never seen before; (1, 2) last followed by 5
    idx.append(5)
    assert idx.draft(2) == [6, 9]  # (1, 2, 5) seen at 4
    assert E.NgramIndex([7, 8], n_max=2).draft(4) == []
    assert E.NgramIndex([3, 3], n_max=2).draft(4) == [3]


def test_prompt_lookup_keeps_greedy_output_with_accepted_and_rejected_drafts(tiny_lm, monkeypatch):
    from tessera.lm.local import GenerationStats

    row = rows_with_shared_prefix(6)[1]
    ref = tiny_lm.generate_batch([row], max_new_tokens=24, engine="hf")[0].token_ids
    n_prompt = len(row)

    def oracle(self, k):  # the true continuation, its last draft token wrong: exercises both paths
        done = len(self.tokens) - n_prompt
        d = list(ref[done:done + k])
        if len(d) >= 3:
            d[-1] = (d[-1] + 1) % 1000
        return d

    monkeypatch.setattr(E.NgramIndex, "draft", oracle)
    st = GenerationStats()
    text = "".join(tiny_lm.stream(torch.tensor([row]), max_new_tokens=24, stats=st))
    assert text == tiny_lm.tokenizer.decode(ref, skip_special_tokens=True)
    assert 0 < st.accepted_tokens < st.drafted_tokens
    out = tiny_lm.generate_batch([row], max_new_tokens=24, engine="tessera")[0]
    assert out.token_ids == ref
    tiny_lm.lookup_tokens = 0
    try:
        assert tiny_lm.generate_batch([row], max_new_tokens=24, engine="tessera")[0].token_ids == ref
    finally:
        tiny_lm.lookup_tokens = 10


def test_rows_of_different_contexts_get_their_own_anchor(tiny_lm):
    head = list(range(1000, 1020))
    ctx_a = [list(range(2000 + 10 * i, 2007 + 10 * i)) for i in range(5)]
    ctx_b = [list(range(4000 + 10 * i, 4007 + 10 * i)) for i in range(5)]
    stmt = [5000, 5001, 5002]

    def ablations(ctx):
        full = head + [t for s in ctx for t in s] + stmt
        return [(full, 3)] + [(head + [t for j, s in enumerate(ctx) if j != i for t in s] + stmt, 3) for i in range(5)]

    rows = ablations(ctx_a) + ablations(ctx_b)
    groups = E.anchor_groups([r for r, _ in rows], [n + 1 for _, n in rows])
    members = {frozenset(m) for _, m in groups}
    # each context's full prompt anchors its ablations (a row that drops the first sentence shares only the
    # header with any anchor, so it may stand alone: the same tokens run either way)
    assert frozenset([0, 2, 3, 4, 5]) <= max(members, key=lambda m: 0 in m)
    assert frozenset([6, 8, 9, 10, 11]) <= max(members, key=lambda m: 6 in m)
    ours = tiny_lm.score(rows, batch_size=4, engine="tessera")
    ref = tiny_lm.score(rows, batch_size=4, engine="hf")
    assert max(abs(x - y) for a, b in zip(ours, ref) for x, y in zip(a, b)) < 1e-4
    assert tiny_lm.last_score_stats["anchors"] == len(groups)
    assert tiny_lm.last_score_stats["computed_tokens"] < 0.6 * tiny_lm.last_score_stats["tokens"]
