"""Sentence numbering, the prompt segments, and the lenient citation parser."""

import random

from attribution_fixtures import one_thread  # noqa: F401

import pytest

from tessera.attribution.format import (
    CitationContext,
    CitePrompt,
    ParseStats,
    format_response,
    parse_citation,
    parse_response,
    span_numbers,
    spans_from_numbers,
)
from tessera.data.qa import HotpotExample
from tessera.errors import InputError

TEXT = "Paris is the capital of France. It has 2 million people.\n\nBerlin is in Germany. Dr. Smith lives there."


def test_from_text_numbers_sentences_with_offsets():
    ctx = CitationContext.from_text(TEXT, doc_id="doc")
    assert [s.number for s in ctx.sentences] == [1, 2, 3, 4]
    assert ctx[4].text == "Dr. Smith lives there."  # pysbd keeps the abbreviation
    for s in ctx.sentences:
        assert TEXT[s.start:s.end] == s.text and s.doc_id == "doc"
    assert ctx.numbered().splitlines()[0] == "<C1> Paris is the capital of France."
    assert ctx.numbered(keep=[2, 4]) == "<C2> It has 2 million people.\n<C4> Dr. Smith lives there.\n"


def test_empty_context_is_an_input_error():
    with pytest.raises(InputError, match="empty"):
        CitationContext.from_text("  \n ")


def test_from_passages_maps_offsets_to_documents():
    doc = "Intro text here. " + TEXT
    start = len("Intro text here. ")
    passages = [{"text": TEXT, "doc_id": "d1", "title": "Cities", "start": start, "number": 3},
                {"text": "Rome is old.", "doc_id": "d2", "start": 0}]
    ctx = CitationContext.from_passages(passages)
    assert len(ctx) == 5
    assert all(doc[s.start:s.end] == s.text for s in ctx.sentences[:4])
    assert ctx[1].source == 3 and ctx[1].title == "Cities" and ctx[5].doc_id == "d2" and ctx[5].source == 2


def test_from_hotpot_keeps_gold_and_limits():
    ex = HotpotExample(id="x", question="q", answer="a", context=[
        ("A", ["a0.", " a1.", " a2.", " a3."]), ("B", ["b0.", " b1."]), ("C", ["c0."]), ("D", ["d0."])],
        supporting_facts=[("A", 3), ("B", 0)])
    full = CitationContext.from_hotpot(ex)
    assert len(full) == 8 and full[4].key == ("A", 3) and full[4].text == "a3."
    small = CitationContext.from_hotpot(ex, max_distractors=1, max_sentences_per_paragraph=1)
    assert [s.key for s in small.sentences] == [("A", 0), ("A", 1), ("A", 2), ("A", 3), ("B", 0), ("C", 0)]
    para = "".join(ex.context[0][1])
    assert all(para[s.start:s.end] == s.text for s in small.sentences if s.title == "A")


def test_prompt_segments_share_prefixes(tiny_lm):
    ctx = CitationContext.from_text(TEXT)
    p = CitePrompt(tiny_lm.tokenizer, ctx, "Where is Berlin?")
    full = p.ids()
    assert len(full) == len(p)
    dropped = p.ids([1, 2, 4])  # drop sentence 3
    L = p.shared_prefix(3)
    assert dropped[:L] == full[:L] and dropped[L:L + 4] != full[L:L + 4]
    assert p.ids([2])[:len(p.head_ids)] == p.head_ids
    assert "[Document Start]\n<C1> Paris" in p.text() and p.text([2]).count("<C") == 1 + p.text().count("<C{")
    with pytest.raises(InputError, match="question is empty"):
        CitePrompt(tiny_lm.tokenizer, ctx, "  ")


@pytest.mark.parametrize("body, n, expected", [
    ("[1-2][3-4]", 10, [(1, 4)]),            # adjacent ranges merge (official rule)
    ("[1-3][2-5]", 10, [(1, 5)]),            # overlapping ranges merge (lenient)
    ("[1-1][3-3][5-5][7-7]", 10, [(1, 1), (3, 3), (5, 5)]),  # at most 3 kept
    ("[1-1][2-2][4-4][6-6][8-8]", 10, [(1, 2), (4, 4), (6, 6)]),  # merge first, then keep 3
    ("[12-14]", 10, []),                     # starts past the end: dropped
    ("[8-14]", 10, [(8, 10)]),               # end clamped
    ("[5-3]", 10, []),                       # reversed: dropped (official)
    ("[0-2]", 10, [(1, 2)]),                 # start raised to 1
    ("[4]", 10, [(4, 4)]),                   # singleton
    ("[C2-C3]", 10, [(2, 3)]),               # C prefixes
    ("see above!!", 10, []),                 # garbage
    ("", 10, []),
])
def test_parse_citation(body, n, expected):
    assert parse_citation(body, n) == expected


def test_parse_citation_counts_repairs():
    st = ParseStats()
    parse_citation("[5-3] junk [12-13][1-2][3-3][8-20]", 10, stats=st)
    assert (st.reversed, st.out_of_range, st.merged, st.garbage, st.spans) == (1, 2, 1, 1, 2)
    clean = ParseStats()
    parse_citation("[1-2][5-6]", 10, stats=clean)
    assert clean.repairs == 0 and clean.spans == 2


def test_parse_response_well_formed_and_round_trip():
    ctx = CitationContext.from_text(TEXT)
    text = format_response([("Paris is French.", [(1, 1)]), ("Berlin is German.", [(3, 4)])])
    parsed = parse_response(text, ctx)
    assert [s.text for s in parsed.statements] == ["Paris is French.", "Berlin is German."]
    assert parsed.statements[1].spans == [(3, 4)] and [c.number for c in parsed.statements[1].cited] == [3, 4]
    assert parsed.stats.repairs == 0 and parsed.stats.statements == 2


def test_parse_response_lenient():
    r = parse_response("Intro. <statement>A<cite>[1-2]</statement><statement>B<cite>[9-9]</cite> tail", 4)
    # an unclosed statement runs to the end of the text
    assert [s.text for s in r.statements] == ["Intro.", "A", "B tail"]
    assert r.statements[1].spans == [(1, 2)] and r.statements[2].spans == []
    assert r.stats.untagged == 1 and r.stats.unclosed == 2 and r.stats.out_of_range == 1
    r = parse_response("<statement>no cite here</statement>", 4)
    assert r.statements[0].spans == [] and r.stats.no_citation == 1


def test_parser_never_crashes_on_garbage():
    rng = random.Random(0)
    alphabet = list("<>/[]-0123456789 abcCstatemnit\n") + ["<statement>", "</statement>", "<cite>", "</cite>", "[1-2]"]
    for _ in range(500):
        junk = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60)))
        out = parse_response(junk, rng.randint(1, 20))
        for s in out.statements:
            assert len(s.spans) <= 3 and all(1 <= a <= b for a, b in s.spans)
    assert parse_response(None, 3).statements == []  # type: ignore[arg-type]


def test_span_helpers():
    assert spans_from_numbers([5, 1, 2, 3, 7]) == [(1, 3), (5, 5), (7, 7)]
    assert span_numbers([(1, 2), (2, 4)]) == [1, 2, 3, 4]
