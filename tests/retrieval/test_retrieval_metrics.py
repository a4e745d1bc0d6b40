"""Metrics against values computed by hand; excluded ids; TREC run files."""

from __future__ import annotations

import math

import pytest

from tessera.data.types import Collection, Document, Query
from tessera.errors import InputError
from tessera.retrieval.metrics import evaluate, ranked, read_trec_run, remove_excluded, truncate_run, write_trec_run

QRELS = {
    "q1": {"d1": 2, "d2": 1, "d3": 0, "d4": 1},  # graded
    "q2": {"d9": 1},
    "q3": {"d1": 0},  # judged, nothing relevant: does not count
    "q4": {"d7": 1},  # relevant documents but no ranking: counts 0
}
RUN = {
    "q1": {"d3": 0.9, "d1": 0.8, "d5": 0.7, "d2": 0.6},
    # d9 at rank 11: counts for Recall@100 but not for nDCG@10 or MRR@10
    "q2": {**{f"x{i:02d}": 1.0 - i / 100 for i in range(10)}, "d9": 0.5},
    "q3": {"d1": 1.0},
    "q5": {"d1": 1.0},  # not judged: ignored
}


def test_graded_ndcg_recall_mrr_by_hand():
    res = evaluate(RUN, QRELS)
    # q1: gains 0, 2, 0, 1 at ranks 1..4 (trec_eval: gain = grade, discount log2(rank + 1))
    dcg = 0 / math.log2(2) + 2 / math.log2(3) + 0 / math.log2(4) + 1 / math.log2(5)
    idcg = 2 / math.log2(2) + 1 / math.log2(3) + 1 / math.log2(4)  # ideal order: 2, 1, 1
    ndcg_q1 = dcg / idcg
    assert ndcg_q1 == pytest.approx(0.540586, abs=1e-6)  # 1.692537 / 3.130930
    pq = res["per_query"]
    assert set(pq) == {"q1", "q2", "q4"}
    assert pq["q1"]["ndcg@10"] == pytest.approx(ndcg_q1, abs=1e-12)
    assert pq["q1"]["recall@100"] == pytest.approx(2 / 3)  # d1, d2 of d1, d2, d4
    assert pq["q1"]["mrr@10"] == pytest.approx(1 / 2)  # first relevant (d1) at rank 2
    assert pq["q2"] == {"ndcg@10": 0.0, "recall@100": 1.0, "mrr@10": 0.0}
    assert pq["q4"] == {"ndcg@10": 0.0, "recall@100": 0.0, "mrr@10": 0.0}
    assert res["n_queries"] == 3
    assert res["ndcg@10"] == pytest.approx(ndcg_q1 / 3)
    assert res["recall@100"] == pytest.approx((2 / 3 + 1) / 3)
    assert res["mrr@10"] == pytest.approx(0.5 / 3)


def test_cutoffs_follow_arguments():
    res = evaluate(RUN, QRELS, k_ndcg=3, k_recall=2, k_mrr=1)
    q1 = res["per_query"]["q1"]
    assert q1["ndcg@3"] == pytest.approx((2 / math.log2(3)) / (2 + 1 / math.log2(3) + 1 / math.log2(4)))
    assert q1["recall@2"] == pytest.approx(1 / 3)
    assert q1["mrr@1"] == 0.0
    assert evaluate(RUN, QRELS, k_recall=11)["per_query"]["q2"]["recall@11"] == 1.0
    assert evaluate(RUN, QRELS, k_recall=10)["per_query"]["q2"]["recall@10"] == 0.0


def test_ties_are_broken_by_docid_descending_like_trec_eval():
    run_a = {"q": {"a": 1.0, "b": 1.0, "c": 1.0}}
    run_b = {"q": {"c": 1.0, "a": 1.0, "b": 1.0}}  # same run, other insertion order
    qrels = {"q": {"a": 1}}
    assert [d for d, _ in ranked(run_a["q"])] == ["c", "b", "a"]
    for run in (run_a, run_b):
        res = evaluate(run, qrels, k_mrr=10)
        assert res["mrr@10"] == pytest.approx(1 / 3)
        assert res["ndcg@10"] == pytest.approx(1 / math.log2(4))
        # the MRR cut keeps the same two documents trec_eval ranks first (c, b): a is cut
        assert evaluate(run, qrels, k_mrr=2)["mrr@2"] == 0.0
    assert truncate_run(run_b, 2) == {"q": {"c": 1.0, "b": 1.0}}


def test_empty_inputs_and_bad_scores():
    assert evaluate({}, {})["n_queries"] == 0
    assert evaluate({"q": {}}, {"q": {"a": 1}})["ndcg@10"] == 0.0
    with pytest.raises(InputError):
        evaluate({"q": {"a": float("nan")}}, {"q": {"a": 1}})
    with pytest.raises(InputError):
        evaluate({"q": {"a": 1.0}}, {"q": {"a": 1}}, k_ndcg=0)


def test_remove_excluded_before_scoring():
    run = {"q1": {"gold": 0.5, "self": 0.9, "other": 0.7}, "q2": {"x": 1.0}}
    queries = [Query("q1", "t", ("self", "never-retrieved")), Query("q2", "t")]
    cleaned = remove_excluded(run, queries)
    assert cleaned == {"q1": {"gold": 0.5, "other": 0.7}, "q2": {"x": 1.0}}
    assert remove_excluded(run, {"q1": ["self"]})["q1"] == {"gold": 0.5, "other": 0.7}
    assert run["q1"]["self"] == 0.9  # input untouched
    qrels = {"q1": {"gold": 1}}
    assert evaluate(run, qrels)["mrr@10"] == pytest.approx(1 / 3)
    assert evaluate(cleaned, qrels)["mrr@10"] == pytest.approx(1 / 2)


def test_bm25_run_removes_excluded_and_still_returns_k():
    from tessera.retrieval.search import bm25_run

    docs = [Document("self", "", "gravity waves gravity waves gravity"), Document("gold", "", "gravity waves detected"),
            Document("d3", "", "gravity"), Document("d4", "", "waves in the ocean"), Document("d5", "", "nothing here")]
    coll = Collection(docs, [Query("q", "gravity waves", ("self",))], {"q": {"gold": 1}})
    run = bm25_run(coll, k=2)
    assert list(run["q"])[0] == "gold"
    assert "self" not in run["q"] and len(run["q"]) == 2


def test_write_and_read_trec_run(tmp_path):
    run = {"q2": {"b": 1.0, "a": 1.0, "c": 3.5}, "q1": {"z": 0.25}}
    path = write_trec_run(tmp_path / "out" / "run.trec", run, tag="my tag")
    lines = path.read_text().splitlines()
    assert lines == [
        "q2 Q0 c 1 3.500000 mytag",
        "q2 Q0 b 2 1.000000 mytag",
        "q2 Q0 a 3 1.000000 mytag",
        "q1 Q0 z 1 0.250000 mytag",
    ]
    assert read_trec_run(path) == {"q2": {"c": 3.5, "b": 1.0, "a": 1.0}, "q1": {"z": 0.25}}
    assert [p.name for p in path.parent.iterdir()] == ["run.trec"]  # no temporary files left


def test_write_trec_run_rejects_spaces_and_writes_nothing(tmp_path):
    with pytest.raises(InputError):
        write_trec_run(tmp_path / "run.trec", {"q": {"doc 1": 1.0}})
    assert list(tmp_path.iterdir()) == []
