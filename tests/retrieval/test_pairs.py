"""Training pairs from documents alone (`tessera retrieval pairs`): Contriever crops, title pairs, BM25 negatives."""

from __future__ import annotations

import json
import random

import pytest

from tessera.data.types import Document
from tessera.errors import EmptyCorpusError, InputError
from tessera.retrieval import pairs as P
from tessera.retrieval.train import read_training_rows
from tessera_testing import run_cli, shared_data_or_skip

WORDS = [f"w{i}" for i in range(400)]


def _corpus(n: int = 30) -> list[Document]:
    rng = random.Random(0)
    vocab = [f"term{i}" for i in range(300)]
    docs = []
    for i in range(n):
        body = " ".join(rng.choice(vocab) for _ in range(60)) + f". Second sentence of document {i} is here."
        docs.append(Document(f"d{i}", f"Title of document {i}" if i % 2 else "", f"Opening sentence number {i}. {body}"))
    return docs


def test_crop_is_a_contiguous_span_of_the_allowed_length_with_words_dropped():
    s = P.PairSettings(word_dropout=0.0)
    chunk = WORDS[:200]
    for seed in range(50):
        span = P.crop_span(chunk, random.Random(seed), s).split()
        start = chunk.index(span[0])
        assert span == chunk[start:start + len(span)], "without dropout a crop is contiguous"
        assert 0.1 * 200 - 1 <= len(span) <= 0.5 * 200 + 1
    dropped = P.crop_span(chunk, random.Random(1), P.PairSettings(word_dropout=0.5, min_ratio=0.5, max_ratio=0.5)).split()
    assert 20 < len(dropped) < 90, "about half of the 100 cropped words are deleted"
    assert dropped == sorted(dropped, key=chunk.index), "dropout keeps the order"


def test_crops_come_from_chunks_of_a_long_document():
    doc = Document("long", "", " ".join(WORDS))
    pairs = P.crop_pairs(doc, random.Random(0), P.PairSettings(chunk_words=100, max_chunks_per_doc=3, word_dropout=0))
    assert len(pairs) == 3
    for k, (q, p) in enumerate(pairs):
        chunk = set(WORDS[100 * k:100 * (k + 1)])
        assert set(q.split()) <= chunk and set(p.split()) <= chunk, "query and positive come from the same chunk"


def test_title_pair_and_first_sentence_fallback():
    s = P.PairSettings()
    assert P.title_pair(Document("a", "Heat  transfer", "Flow over a flat plate at high speed was measured."), s) == (
        "Heat transfer", "Flow over a flat plate at high speed was measured.")
    q, pos = P.title_pair(Document("b", "", "Boundary layers thicken downstream. The rest of the abstract follows here."), s)
    assert (q, pos) == ("Boundary layers thicken downstream.", "The rest of the abstract follows here.")
    assert P.title_pair(Document("c", "", "one sentence only without an end"), s) is None
    assert P.title_pair(Document("d", "A title", "too short"), s) is None


def test_rows_depend_only_on_seed_source_and_document():
    docs = _corpus(6)
    s = P.PairSettings(negatives="none")
    alone = P.doc_rows("src", docs[3], s)
    assert alone == P.doc_rows("src", docs[3], s)
    assert alone != P.doc_rows("src", docs[3], P.PairSettings(negatives="none", seed=1))
    everything = [r for d in docs for r in P.doc_rows("src", d, s)]
    assert [r for r in everything if r["source"]["doc_id"] == "d3"] == alone
    twin = Document("twin", docs[3].title, docs[3].text)
    assert [r["query"] for r in P.doc_rows("src", twin, s) if r["source"]["kind"] == "crop"] != [
        r["query"] for r in alone if r["source"]["kind"] == "crop"], "each document draws its own crops"
    kinds = {r["source"]["kind"] for r in alone}
    assert kinds == {"crop", "title"} and all(r["id"].startswith("src:d3:") for r in alone)


def test_bm25_negative_is_never_the_source_and_ranks_low():
    docs = _corpus(40)
    s = P.PairSettings(min_neg_rank=20)
    rows = [r for d in docs for r in P.doc_rows("src", d, s)]
    counts = P.add_negatives(rows, docs, s)
    by_id = {d.id: d for d in docs}
    for r in rows:
        assert r["source"]["neg_doc_id"] != r["source"]["doc_id"]
        assert r["neg"][0][1] == " ".join(by_id[r["source"]["neg_doc_id"]].full_text.split()[:s.max_pos_words])
    assert counts["ranked"] == len(rows) and min(counts["ranks"]) >= 20
    near = P.PairSettings(min_neg_rank=1, kinds=("title",))
    rows = [r for d in docs for r in P.doc_rows("src", d, near)]
    P.add_negatives(rows, docs, near)
    assert all(r["source"]["neg_doc_id"] != r["source"]["doc_id"] for r in rows), "the source is skipped even at rank 1"
    with pytest.raises(EmptyCorpusError, match="second document"):
        P.add_negatives(P.doc_rows("src", docs[0], s), docs[:1], s)


def _folder(tmp_path, docs):
    folder = tmp_path / "corpus"
    folder.mkdir()
    with open(folder / "docs.jsonl", "w") as f:
        for d in docs:
            f.write(json.dumps({"id": d.id, "title": d.title, "text": d.text}) + "\n")
    return folder


def test_build_pairs_writes_training_rows_and_resumes(tmp_path, monkeypatch):
    folder = _folder(tmp_path, _corpus(30))
    out = tmp_path / "pairs.jsonl"
    stats = P.build_pairs([str(folder)], out, P.PairSettings())
    data = read_training_rows(str(out), n_negatives=1)
    assert stats["rows"] == len(data.examples) > 30
    saved = json.loads(out.with_suffix(".stats.json").read_text())
    assert saved["rows"] == stats["rows"] and saved["settings"]["min_neg_rank"] == 20
    first = out.read_bytes()

    def no_recompute(*a, **k):
        raise AssertionError("a finished source is not computed again")

    monkeypatch.setattr(P, "source_rows", no_recompute)
    again = P.build_pairs([str(folder)], out, P.PairSettings())
    assert out.read_bytes() == first and all(st["resumed"] for st in again["sources"].values())


@pytest.mark.parametrize("kwargs,match", [({"kinds": ("crops",)}, "unknown pair kind"), ({"negatives": "dpr"}, "--negatives"),
                                          ({"min_ratio": 0.6, "max_ratio": 0.5}, "ratios"), ({"chunk_words": 0}, "at least 1")])
def test_bad_settings_are_one_line_errors(tmp_path, kwargs, match):
    with pytest.raises(InputError, match=match):
        P.build_pairs([str(_folder(tmp_path, _corpus(3)))], tmp_path / "x.jsonl", P.PairSettings(**kwargs))
    assert not (tmp_path / "x.jsonl").exists()


def test_cli_pairs_bad_input_exits_2_and_writes_nothing(tmp_path):
    out = tmp_path / "p.jsonl"
    proc = run_cli("retrieval", "pairs", str(tmp_path / "missing"), "--out", str(out))
    assert proc.returncode == 2 and "not found" in proc.stderr and not out.exists()
    proc = run_cli("retrieval", "pairs", "cranfield", "--out", str(out), "--kinds", "crop,bogus")
    assert proc.returncode == 2 and "unknown pair kind" in proc.stderr and not out.exists()


def test_cli_pairs_on_cranfield(tmp_path):
    shared_data_or_skip("ir", "cranfield")
    out = tmp_path / "cran.jsonl"
    proc = run_cli("retrieval", "pairs", "cranfield", "--out", str(out), "--kinds", "title")
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) > 1300 and all(r["source"]["kind"] == "title" for r in rows)
    assert all(r["source"]["neg_doc_id"] != r["source"]["doc_id"] for r in rows)


@pytest.mark.integration
def test_minilm_negatives_are_ranked_by_the_encoder():
    docs = _corpus(30)
    s = P.PairSettings(negatives="minilm", min_neg_rank=5, kinds=("title",))
    rows = [r for d in docs for r in P.doc_rows("src", d, s)]
    counts = P.add_negatives(rows, docs, s)
    assert counts["ranked"] == len(rows) and min(counts["ranks"]) >= 5
    assert all(r["source"]["neg_by"] == "minilm" and r["source"]["neg_doc_id"] != r["source"]["doc_id"] for r in rows)
    ranked = P.dense_hits([rows[0]["query"][1]], docs, k=30)[0]
    assert [i for i, _ in ranked].index(int(rows[0]["source"]["neg_doc_id"][1:])) + 1 == rows[0]["source"]["neg_rank"]
    hits = P.dense_hits([docs[3].full_text], docs, k=3)[0]
    assert hits[0][0] == 3 and hits[0][1] >= hits[1][1], "a document's own text ranks it first"
