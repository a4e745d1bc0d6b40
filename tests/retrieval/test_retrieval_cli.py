"""`tessera retrieval eval | index | search` and `tessera ask --retriever dense`, end to end."""

from __future__ import annotations

import json

import pytest

from tessera_testing import run_cli, shared_data_or_skip

CORPUS = {
    "cat.txt": "The cat slept on the warm mat all afternoon.",
    "stocks.txt": "Stock markets fell sharply after the interest rate decision.",
    "python.txt": "Python lists are mutable sequences; tuples are immutable.",
}


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    for name, text in CORPUS.items():
        (folder / name).write_text(text + "\n")
    return folder


def _one_line_error(proc) -> str:
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


def test_eval_cranfield_bm25_writes_run_and_metrics(tmp_path):
    shared_data_or_skip("ir", "cranfield")
    from tessera.data.ir import read_cranfield
    from tessera.data.paths import shared_data_dir
    from tessera.retrieval.metrics import evaluate, read_trec_run

    out = tmp_path / "eval"
    proc = run_cli("retrieval", "eval", "--collection", "cranfield", "--retriever", "bm25", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "nDCG@10" in proc.stdout and "Recall@100" in proc.stdout and "MRR@10" in proc.stdout
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json", "run.trec"]
    doc = json.loads((out / "metrics.json").read_text())
    assert doc["retriever"] == "bm25" and doc["n_queries"] == 225 and doc["n_docs"] == 1400
    m = doc["metrics"]
    assert 0.3 < m["ndcg@10"] < 0.5 and 0.6 < m["recall@100"] < 0.9 and 0.4 < m["mrr@10"] < 0.7
    lines = (out / "run.trec").read_text().splitlines()
    assert len(lines) == 225 * 100 and lines[0].split()[1] == "Q0" and lines[0].split()[3] == "1"
    # the file on disk scores the same as the JSON says
    coll = read_cranfield(shared_data_dir() / "ir" / "cranfield")
    again = evaluate(read_trec_run(out / "run.trec"), coll.qrels)
    assert again["ndcg@10"] == pytest.approx(m["ndcg@10"], abs=1e-6)
    assert again["mrr@10"] == pytest.approx(m["mrr@10"], abs=1e-6)


def test_eval_bad_input_is_one_line_and_writes_nothing(tmp_path):
    out = tmp_path / "never"
    err = _one_line_error(run_cli("retrieval", "eval", "--collection", "cranfield", "--retriever", "splade", "--out", str(out)))
    assert "bm25, dense, hybrid" in err
    err = _one_line_error(run_cli("retrieval", "eval", "--collection", f"cranfield:{tmp_path / 'nope'}", "--out", str(out)))
    assert "not found" in err
    empty = tmp_path / "empty-shared"
    empty.mkdir()
    err = _one_line_error(run_cli("retrieval", "eval", "--collection", "vaswani", "--out", str(out),
                                  env={"TESSERA_SHARED_DATA": str(empty)}))
    assert "vaswani:PATH" in err
    err = _one_line_error(run_cli("retrieval", "eval", "--collection", "msmarco", "--out", str(out)))
    assert "beir:PATH" in err
    assert not out.exists()


def test_index_and_search_hybrid(tmp_path, corpus_dir):
    out = tmp_path / "idx"
    proc = run_cli("retrieval", "index", str(corpus_dir), "--out", str(out), "--retriever", "hybrid")
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["bm25", "dense", "docs.jsonl", "index.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]  # no temporary or work folders left
    meta = json.loads((out / "index.json").read_text())
    assert meta["indexes"] == ["bm25", "dense"] and meta["n_docs"] == 3 and meta["encoder"] == "default-encoder"

    # no word in common with the cat document: BM25 finds nothing, dense finds it
    proc = run_cli("retrieval", "search", str(out), "where did the kitten rest", "--json", "--retriever", "dense", "-k", "2")
    assert proc.returncode == 0, proc.stderr
    hits = json.loads(proc.stdout)
    assert [h["rank"] for h in hits] == [1, 2] and hits[0]["doc_id"] == "cat.txt"
    assert hits[0]["score"] > hits[1]["score"]

    err = _one_line_error(run_cli("retrieval", "search", str(tmp_path), "anything"))
    assert "not a tessera index" in err


def test_ask_dense_end_to_end(corpus_dir, tiny_lm_dir, tessera_home):
    proc = run_cli("ask", "where did the kitten rest?", "--corpus", str(corpus_dir), "--lm", str(tiny_lm_dir),
                   "--retriever", "dense", "--k", "1", "--max-new-tokens", "4", "--json")
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout)
    assert res["retriever"] == "dense"
    assert [s["doc_id"] for s in res["sources"]] == ["cat.txt"]
    assert list(tessera_home.glob("indexes/*/dense-*/index.faiss"))  # cached next to the BM25 index
    err = _one_line_error(run_cli("ask", "anything", "--corpus", str(corpus_dir), "--lm", str(tiny_lm_dir), "--retriever", "colbert"))
    assert "bm25, dense, hybrid" in err


def test_corpus_index_hybrid_and_cache_reuse(corpus_dir, tessera_home):
    from tessera.retrieval.corpus_index import CorpusIndex

    index = CorpusIndex.open(str(corpus_dir))
    hits = index.search("kitten resting on a mat", 3, retriever="hybrid")
    assert hits[0].passage.doc_id == "cat.txt" and [h.rank for h in hits] == [1, 2, 3]
    assert index.search("kitten", 2) == index.search("kitten", 2, retriever="bm25")  # old call unchanged
    again = CorpusIndex.open(str(corpus_dir))
    dense = again.dense("default-encoder")
    assert dense.doc_ids == [p.id for p in index.passages] and again.path == index.path
