"""Reranker: P(Yes) normalisation, min-max, 0.5/0.5 fusion arithmetic, reranking a run."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "lm"))

from scripted import ScriptedBackend  # noqa: E402

from tessera.errors import InputError  # noqa: E402
from tessera.retrieval.metrics import ranked  # noqa: E402
from tessera.retrieval.rerank import fuse_scores, minmax, relevance_messages, rerank_run, yes_probability  # noqa: E402


def test_yes_probability():
    assert yes_probability({"Yes": math.log(0.3), "No": math.log(0.1)}) == pytest.approx(0.75)
    assert yes_probability({"Yes": -math.inf, "No": -math.inf}) == 0.5
    assert yes_probability({"Yes": -1000.0, "No": -math.inf}) == 1.0


def test_minmax_and_fusion_arithmetic():
    assert minmax({"a": 2.0, "b": 4.0, "c": 3.0}) == {"a": 0.0, "b": 1.0, "c": 0.5}
    assert minmax({"a": 1.0, "b": 1.0}) == {"a": 0.5, "b": 0.5}
    retr = {"a": 0.9, "b": 0.7, "c": 0.5}
    llm = {"a": 0.2, "b": 0.8, "c": 0.6}
    fused = fuse_scores(retr, llm)
    # retriever min-max: a 1, b .5, c 0; reranker: a 0, b 1, c 2/3
    assert fused == pytest.approx({"a": 0.5, "b": 0.75, "c": 1 / 3})
    assert fuse_scores(retr, llm, weight=1.0) == pytest.approx({"a": 1.0, "b": 0.5, "c": 0.0})
    assert fuse_scores(retr, llm, weight=0.0) == pytest.approx({"a": 0.0, "b": 1.0, "c": 2 / 3})
    with pytest.raises(InputError):
        fuse_scores(retr, llm, weight=1.5)


def test_rerank_run_reorders_top_n_and_keeps_the_rest_below():
    run = {"q": {"d1": 10.0, "d2": 9.0, "d3": 8.0, "d4": 7.0, "d5": 1.0}}
    texts = {f"d{i}": f"document {i}" for i in range(1, 6)}
    p_yes = {"document 1": 0.1, "document 2": 0.2, "document 3": 0.99}

    def lp(conv, cands):
        doc = conv[0]["content"].split("Document: ")[1].split("\n")[0]
        return {"Yes": math.log(p_yes[doc]), "No": math.log(1 - p_yes[doc])}

    b = ScriptedBackend(logprobs=lp)
    new, llm = rerank_run(run, {"q": "the query"}, texts, b, top_n=3)
    assert llm["q"] == pytest.approx(p_yes_by_id := {"d1": 0.1, "d2": 0.2, "d3": 0.99})
    assert p_yes_by_id  # (named for readability)
    # fused: d1 = .5*1 + .5*0 = .5; d2 = .5*.5 + .5*(.1/.89) ; d3 = 0 + .5*1 = .5
    assert new["q"]["d2"] == pytest.approx(0.25 + 0.5 * 0.1 / 0.89)
    order = [d for d, _ in ranked(new["q"])]
    assert set(order[:3]) == {"d1", "d2", "d3"} and order[3:] == ["d4", "d5"]
    assert b.calls[0]["n"] == 3


def test_relevance_prompt():
    m = relevance_messages("q?", "word " * 500, max_doc_words=20)
    assert "Is this document relevant to the query? Answer Yes or No." in m[0]["content"]
    assert m[0]["content"].count("word") == 20


def test_cli_search_and_eval_with_rewrite_and_rerank(tmp_path, tiny_lm_dir):
    import json

    from tessera_testing import run_cli

    beir = tmp_path / "beir"
    (beir / "qrels").mkdir(parents=True)
    topics = ["protein folding", "volcanic ash", "coral bleaching", "battery anodes", "malaria resistance", "glacier melt"]
    (beir / "corpus.jsonl").write_text("\n".join(json.dumps({"_id": f"d{i}", "title": t, "text": f"A study of {t} and its causes."})
                                                 for i, t in enumerate(topics)))
    (beir / "queries.jsonl").write_text("\n".join(json.dumps({"_id": f"q{i}", "text": f"what causes {t}"}) for i, t in enumerate(topics[:3])))
    (beir / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(f"q{i}\td{i}\t1\n" for i in range(3)))
    out = tmp_path / "eval"
    r = run_cli("retrieval", "eval", "--collection", f"beir:{beir}", "--out", str(out), "--rewrite", "reason", "--rerank", "3",
                "--rewrite-tokens", "6", "--lm", str(tiny_lm_dir), "--limit", "2")
    assert r.returncode == 0, r.stderr
    doc = json.loads((out / "metrics.json").read_text())
    assert doc["n_queries"] == 2 and doc["rerank"]["top_n"] == 3 and doc["rewrite"]["n"] == 2
    assert len((out / "rewrites.jsonl").read_text().splitlines()) == 2
    assert "rerank" in (out / "run.trec").read_text().split("\n")[0]
    idx = tmp_path / "idx"
    assert run_cli("retrieval", "index", f"beir:{beir}", "--out", str(idx)).returncode == 0
    r = run_cli("retrieval", "search", str(idx), "what causes coral bleaching", "--rerank", "3", "--k", "4", "--json",
                "--rewrite", "reason", "--rewrite-tokens", "4", "--lm", str(tiny_lm_dir))
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert len(res) == 4 and sum("reranker_p_yes" in x for x in res) == 3
    bad = run_cli("retrieval", "search", str(idx), "q", "--rewrite", "hyde")
    assert bad.returncode == 2 and "--rewrite" in bad.stderr
