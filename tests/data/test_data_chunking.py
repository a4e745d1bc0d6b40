"""Sentence splitting and passage chunking: exact offsets, budgets, overlap."""

from __future__ import annotations

import re

import pytest

from tessera.data.chunking import Passage, chunk_documents, chunk_text, count_tokens_simple, split_sentences
from tessera.data.text import python_docs_corpus
from tessera.data.types import Document
from tessera.errors import InputError

TEXT = (
    "The value is 3.14 today. Dr. Smith went to Washington, D.C. on Monday.\n"
    "He said \"hi!\" and left; this line is hard-wrapped\nacross two lines. Short one.\n\n"
    "  A new paragraph starts here without a full stop\n\n"
    "Final sentence?   Yes."
)


def _check_cover(text: str, spans: list[tuple[int, int]]):
    """Spans are trimmed, ordered, disjoint and cover every non-whitespace character."""
    prev = 0
    for a, b in spans:
        assert prev <= a < b <= len(text)
        assert text[a:b] == text[a:b].strip()
        assert text[prev:a].strip() == ""
        prev = b
    assert text[prev:].strip() == ""


@pytest.mark.parametrize("method", ["pysbd", "regex"])
def test_split_sentences_spans(method):
    spans = split_sentences(TEXT, method)
    _check_cover(TEXT, spans)
    sents = [TEXT[a:b] for a, b in spans]
    assert sents[0] == "The value is 3.14 today."
    assert any(s.endswith("this line is hard-wrapped\nacross two lines.") for s in sents)  # a wrap is not a break
    assert any(s.startswith("Dr. Smith went to Washington, D.C. on") for s in sents)
    assert "A new paragraph starts here without a full stop" in sents  # blank lines always break
    assert sents[-2:] == ["Final sentence?", "Yes."]


def test_split_sentences_pysbd_abbreviations():
    sents = [TEXT[a:b] for a, b in split_sentences(TEXT)]
    assert "Dr. Smith went to Washington, D.C. on Monday." in sents
    assert "He said \"hi!\" and left; this line is hard-wrapped\nacross two lines." in sents


def test_split_sentences_edge_cases():
    assert split_sentences("") == [] and split_sentences(" \n\n \t") == []
    assert split_sentences("no punctuation at all") == [(0, 21)]
    with pytest.raises(InputError, match="unknown sentence splitter"):
        split_sentences("x", method="nltk")


def _docs():
    body = " ".join(f"Sentence number {i} has a few words." for i in range(40))
    return [Document("d1", "Title", body), Document("d2", "", TEXT), Document("empty", "", "  ")]


def test_offsets_round_trip_and_ids():
    docs = _docs()
    ps = chunk_documents(docs, max_tokens=30)
    by_id = {d.id: d for d in docs}
    assert all(isinstance(p, Passage) and by_id[p.doc_id].text[p.start : p.end] == p.text for p in ps)
    d1 = [p for p in ps if p.doc_id == "d1"]
    assert [p.id for p in d1] == [f"d1#{i}" for i in range(len(d1))] and all(p.title == "Title" for p in d1)
    assert not [p for p in ps if p.doc_id == "empty"]
    assert chunk_documents(docs, max_tokens=30) == ps  # deterministic


@pytest.mark.parametrize("max_tokens", [9, 20, 64, 256])
def test_budget_respected_and_everything_covered(max_tokens):
    d = _docs()[0]
    ps = chunk_documents([d], max_tokens=max_tokens, overlap_sentences=1)
    assert all(count_tokens_simple(p.text) <= max_tokens for p in ps)
    covered = set()
    for p in ps:
        covered.update(range(p.start, p.end))
    assert all(i in covered for i, ch in enumerate(d.text) if not ch.isspace())


def test_whole_sentences_and_overlap():
    d = _docs()[0]  # every sentence is 8 tokens
    ps = chunk_documents([d], max_tokens=30, overlap_sentences=1)
    for p in ps:
        assert p.text.startswith("Sentence number") and p.text.endswith(".")
    assert len(ps[0].text.split(". ")) == 3  # 3 x 8 = 24 <= 30
    last_of_first = ps[0].text.split(". ")[-1]
    assert ps[1].text.startswith(last_of_first.rstrip("."))  # one sentence shared
    assert ps[1].start < ps[0].end
    no_overlap = chunk_documents([d], max_tokens=30, overlap_sentences=0)
    assert all(a.end < b.start for a, b in zip(no_overlap, no_overlap[1:]))
    two = chunk_documents([d], max_tokens=30, overlap_sentences=2)
    assert len(two) > len(ps) > len(no_overlap)


def test_overlap_never_stalls():
    d = _docs()[0]
    # overlap larger than what fits: still one new sentence per passage, and it ends
    ps = chunk_documents([d], max_tokens=8, overlap_sentences=5)
    assert len(ps) == 40 and all(a.start < b.start for a, b in zip(ps, ps[1:]))


def test_long_sentence_split_by_words():
    words = " ".join(f"w{i}" for i in range(100))
    d = Document("long", "", f"Short start. {words}. Short end.")
    ps = chunk_documents([d], max_tokens=16, overlap_sentences=0)
    assert all(count_tokens_simple(p.text) <= 16 for p in ps)
    assert all(d.text[p.start : p.end] == p.text for p in ps)
    assert ps[0].text == "Short start." and ps[-1].text.endswith("w99. Short end.")  # pieces pack with neighbours
    assert " ".join(p.text for p in ps) == d.text  # no overlap: the pieces tile the text
    assert all(re.fullmatch(r"(w\d+ )*w\d+\.?( Short end\.)?", p.text) for p in ps[1:])


def test_single_overlong_word_is_cut():
    d = Document("x", "", "*" * 50 + " done.")
    ps = chunk_documents([d], max_tokens=8, overlap_sentences=0)
    assert all(count_tokens_simple(p.text) <= 8 and d.text[p.start : p.end] == p.text for p in ps)
    assert [p.text for p in ps] == ["*" * 8] * 6 + ["** done."]


def test_custom_token_counter():
    d = _docs()[0]
    chars = len  # one "token" per character
    ps = chunk_documents([d], max_tokens=120, count_tokens=chars, overlap_sentences=0)
    assert all(len(p.text) <= 120 for p in ps)


def test_bad_arguments():
    with pytest.raises(InputError, match="max_tokens"):
        chunk_text("x", max_tokens=0)
    with pytest.raises(InputError, match="overlap_sentences"):
        chunk_text("x", overlap_sentences=-1)


def test_python_docs_corpus_chunks():
    docs = python_docs_corpus()
    ps = chunk_documents(docs, max_tokens=256)
    by_id = {d.id: d for d in docs}
    assert len(ps) > len(docs)
    assert all(by_id[p.doc_id].text[p.start : p.end] == p.text for p in ps)
    assert all(count_tokens_simple(p.text) <= 256 for p in ps)
    assert len({p.id for p in ps}) == len(ps)


def test_long_paragraphs_split_in_linear_time():
    """pysbd's time grows with the square of a paragraph; long ones go through it in bounded windows."""
    import time

    from tessera.data import chunking

    text = "Tea is hot. " * 20000  # one 240 KB paragraph of one repeated sentence
    t0 = time.perf_counter()
    spans = chunking.split_sentences(text)
    assert time.perf_counter() - t0 < 15  # whole-paragraph pysbd did not finish 200 KB in 30 s
    assert len(spans) == 20000 and all(text[a:b] == "Tea is hot." for a, b in spans)
    words = "a " * 50000  # no sentence end at all: cut at spaces into windows, every character covered
    spans = chunking.split_sentences(words)
    assert all(b - a <= chunking.PYSBD_WINDOW for a, b in spans)
    assert "".join(words[a:b] for a, b in spans).replace(" ", "") == words.replace(" ", "")
