"""Constrained <cite> decoding: every citation is well formed and in range, even from a random model."""

import pytest
import torch
from attribution_fixtures import one_thread  # noqa: F401

from tessera.attribution.constrained import (
    CLOSING,
    INVALID,
    OPEN,
    cite_state,
    generate_cited,
    sample_citations,
)
from tessera.attribution.format import CitationContext, CitePrompt, ParseStats, parse_citation, parse_response
from tessera.errors import ContextTooLongError

WORDS = "apple river stone cloud maple tiger violin lemon harbor candle meadow rocket".split()
TEXT = " ".join(f"The {w} is a thing we discuss here." for w in WORDS)


@pytest.mark.parametrize("s, n, state", [
    ("", 12, OPEN), ("[", 12, OPEN), ("[1", 12, OPEN), ("[12-12]", 12, OPEN), ("[3-4][6-", 12, OPEN),
    ("[0", 12, INVALID), ("[13", 12, INVALID), ("[5-4", 12, INVALID), ("[5-3]", 12, INVALID),
    ("[4-5][5-6]", 12, INVALID),   # must start after the previous range
    ("[4-5][6-", 12, INVALID),     # ... and not right after it (the parser would merge them)
    ("[4-5][7-", 12, OPEN),
    ("[12-12][", 12, INVALID),     # no room for another range
    ("[10-11][", 12, INVALID),
    ("[1-1][2-2][3-3][", 12, INVALID),  # at most 3
    ("[1-2]</ci", 12, CLOSING), ("[1-2]</cite></statement>", 12, CLOSING), ("</", 12, INVALID),
    ("[1-2]</cite></statement>x", 12, INVALID), ("[1-2]x", 12, INVALID), ("[1", 1, OPEN), ("[10", 9, INVALID),
])
def test_cite_grammar(s, n, state):
    assert cite_state(s, n) == state


def _check_well_formed(resp, n):
    assert resp.statements, resp.text
    for st in resp.statements:
        body = st.cite_text
        stats = ParseStats()
        spans = parse_citation(body, n, stats=stats)
        assert spans and spans == st.spans and stats.repairs == 0, body
        assert all(1 <= a <= b <= n for a, b in spans) and len(spans) <= 3
    reparsed = parse_response(resp.text, n)
    assert reparsed.stats.repairs == 0 and [s.spans for s in reparsed.statements] == [s.spans for s in resp.statements]


@pytest.mark.parametrize("n_sent, temperature, seed", [(12, 0.0, 0), (12, 1.5, 1), (3, 1.5, 2), (1, 1.0, 3), (12, 2.0, 4)])
def test_generated_citations_are_well_formed(tiny_lm, n_sent, temperature, seed):
    text = " ".join(f"The {w} is a thing we discuss here." for w in WORDS[:n_sent])
    ctx = CitationContext.from_text(text)
    assert len(ctx) == n_sent
    prompt = CitePrompt(tiny_lm.tokenizer, ctx, "What are the facts?")
    for mode in ("answer-first", "inline"):
        resp = generate_cited(tiny_lm, prompt, max_new_tokens=96, max_statements=2, temperature=temperature, seed=seed, mode=mode)
        _check_well_formed(resp, n_sent)
        # the response is kept in the tokenizer's canonical tokenization, and the cache covers it all
        assert resp.response_ids == tiny_lm.tokenizer(resp.text, add_special_tokens=False)["input_ids"]
        assert resp.cache.get_seq_length() == len(resp.prompt_ids) + len(resp.response_ids)


def test_forced_statements_and_positions(tiny_lm):
    ctx = CitationContext.from_text(TEXT)
    prompt = CitePrompt(tiny_lm.tokenizer, ctx, "What are the facts?")
    resp = generate_cited(tiny_lm, prompt, answer_statements=["First claim here.", "Second one."], max_new_tokens=128)
    assert [s.text for s in resp.statements] == ["First claim here.", "Second one."]
    _check_well_formed(resp, len(ctx))
    tok = tiny_lm.tokenizer
    for (a, b), c, st in zip(resp.statement_tokens, resp.cite_tokens, resp.statements):
        assert st.text.split()[-1].rstrip(".") in tok.decode(resp.response_ids[a:b])
        assert tok.decode(resp.response_ids[:c]).endswith("<cite>")


def test_sampled_citations_are_well_formed(tiny_lm):
    ctx = CitationContext.from_text(TEXT)
    prompt = CitePrompt(tiny_lm.tokenizer, ctx, "What are the facts?")
    resp = generate_cited(tiny_lm, prompt, answer_statements=["A claim."], max_new_tokens=64)
    prefix = resp.prompt_ids + resp.response_ids[:resp.cite_tokens[0]]
    bodies, stats = sample_citations(tiny_lm, resp.cache, prefix, len(ctx), n=10, temperature=2.0, top_p=1.0,
                                     max_tokens=24, generator=torch.Generator().manual_seed(0))
    assert len(bodies) == 10 and stats["forward_calls"] >= 2
    for b in bodies:
        st = ParseStats()
        spans = parse_citation(b, len(ctx), stats=st)
        assert spans and st.repairs == 0, b


def test_question_too_long_for_the_context_window(tiny_lm):
    ctx = CitationContext.from_text(TEXT)
    prompt = CitePrompt(tiny_lm.tokenizer, ctx, "why " * 1200)
    with pytest.raises(ContextTooLongError, match="context holds 1024"):
        generate_cited(tiny_lm, prompt)
