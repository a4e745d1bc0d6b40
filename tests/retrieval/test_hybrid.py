"""Fusion arithmetic against values computed by hand."""

from __future__ import annotations

import pytest

from tessera.errors import InputError
from tessera.retrieval.hybrid import fuse, min_max, normalized_score_fusion, reciprocal_rank_fusion

A = {"q": {"d1": 3.0, "d2": 2.0, "d3": 1.0}}  # e.g. BM25
B = {"q": {"d3": 0.9, "d1": 0.5}}  # e.g. dense; d2 missing


def test_rrf_by_hand():
    fused = reciprocal_rank_fusion([A, B])["q"]
    assert fused["d1"] == pytest.approx(1 / 61 + 1 / 62)
    assert fused["d2"] == pytest.approx(1 / 62)
    assert fused["d3"] == pytest.approx(1 / 63 + 1 / 61)
    assert sorted(fused, key=fused.get, reverse=True) == ["d1", "d3", "d2"]


def test_rrf_weights_depth_and_k():
    fused = reciprocal_rank_fusion([A, B], k=0, weights=[2.0, 1.0])["q"]
    assert fused == pytest.approx({"d1": 2 / 1 + 1 / 2, "d2": 2 / 2, "d3": 2 / 3 + 1 / 1})
    shallow = reciprocal_rank_fusion([A, B], depth=1)["q"]
    assert shallow == pytest.approx({"d1": 1 / 61, "d3": 1 / 61})


def test_rrf_ties_use_trec_eval_order():
    # equal scores: ranks follow docid descending, so "b" is rank 1 and "a" rank 2
    fused = reciprocal_rank_fusion([{"q": {"a": 1.0, "b": 1.0}}])["q"]
    assert fused == pytest.approx({"b": 1 / 61, "a": 1 / 62})


def test_min_max():
    assert min_max({"a": 3.0, "b": 2.0, "c": 1.0}) == pytest.approx({"a": 1.0, "b": 0.5, "c": 0.0})
    assert min_max({"a": 7.0, "b": 7.0}) == {"a": 1.0, "b": 1.0}
    assert min_max({}) == {}


def test_normalized_score_fusion_by_hand():
    fused = normalized_score_fusion([A, B], weights=[0.3, 0.7])["q"]
    # A -> d1 1, d2 .5, d3 0; B -> d3 1, d1 0; d2 gets nothing from B
    assert fused == pytest.approx({"d1": 0.3 * 1 + 0.7 * 0, "d2": 0.3 * 0.5, "d3": 0.3 * 0 + 0.7 * 1})
    assert normalized_score_fusion([A, B])["q"] == pytest.approx({"d1": 1.0, "d2": 0.5, "d3": 1.0})


def test_queries_in_only_one_run_and_errors():
    fused = fuse([A, {"other": {"x": 5.0}}], method="score")
    assert fused["other"] == {"x": 1.0} and set(fused["q"]) == {"d1", "d2", "d3"}
    with pytest.raises(InputError):
        fuse([A, B], method="borda")
    with pytest.raises(InputError):
        fuse([A, B], weights=[1.0])
    with pytest.raises(InputError):
        fuse([])
