"""Hybrid retrieval: fuse several rankings of the same queries into one.

Both fusions take runs ``{qid: {docid: score}}`` (e.g. BM25 and dense) and return
a fused run of the same shape.  A document missing from one run simply gets no
contribution from it.  Ranks inside each run follow
:func:`tessera.retrieval.metrics.ranked` (score descending, ties by docid as
trec_eval orders them), so fusion is deterministic.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from tessera.errors import InputError
from tessera.retrieval.metrics import Run, ranked

RRF_K = 60
FUSIONS = ("rrf", "score")


def _weights(runs: Sequence, weights: Sequence[float] | None) -> list[float]:
    if not runs:
        raise InputError("fusion needs at least one run")
    if weights is None:
        return [1.0] * len(runs)
    if len(weights) != len(runs):
        raise InputError(f"{len(weights)} fusion weights for {len(runs)} runs; give one weight per run")
    if any(w < 0 for w in weights):
        raise InputError("fusion weights must be 0 or more")
    return [float(w) for w in weights]


def _qids(runs) -> list[str]:
    seen: dict[str, None] = {}
    for run in runs:
        for q in run:
            seen.setdefault(q, None)
    return list(seen)


def reciprocal_rank_fusion(runs: Sequence[Mapping[str, Mapping[str, float]]], k: int = RRF_K,
                           weights: Sequence[float] | None = None, depth: int | None = None) -> Run:
    """Reciprocal-rank fusion: ``score(d) = sum_r w_r / (k + rank_r(d))`` with ranks from 1.

    Cormack, Clarke & Büttcher, "Reciprocal Rank Fusion outperforms Condorcet and
    individual Rank Learning Methods", SIGIR 2009, eq. 1, with their ``k = 60``.
    ``weights`` (default 1 each) give weighted RRF; ``depth`` uses only each run's
    top ``depth`` documents.  Only ranks matter, so score scales need not agree.
    """
    ws = _weights(runs, weights)
    if k < 0:
        raise InputError(f"the RRF constant k must be 0 or more, got {k}")
    fused: Run = {}
    for qid in _qids(runs):
        acc: dict[str, float] = {}
        for run, w in zip(runs, ws):
            for rank, (did, _) in enumerate(ranked(run.get(qid, {}), depth), 1):
                acc[did] = acc.get(did, 0.0) + w / (k + rank)
        fused[qid] = acc
    return fused


def min_max(scores: Mapping[str, float]) -> dict[str, float]:
    """Scale one query's scores to 0..1: ``(s - min) / (max - min)``; all-equal scores map to 1."""
    if not scores:
        return {}
    lo, hi = min(scores.values()), max(scores.values())
    if hi == lo:
        return dict.fromkeys(scores, 1.0)
    return {d: (s - lo) / (hi - lo) for d, s in scores.items()}


def normalized_score_fusion(runs: Sequence[Mapping[str, Mapping[str, float]]], weights: Sequence[float] | None = None,
                            depth: int | None = None) -> Run:
    """Weighted sum of per-query min-max normalized scores (CombSUM after min-max).

    Fox & Shaw, "Combination of Multiple Searches", TREC-2 1994 (CombSUM), with the
    per-query min-max normalization of Lee, SIGIR 1997:
    ``score(d) = sum_r w_r * (s_r(d) - min_r) / (max_r - min_r)``, where min/max are
    over the documents run ``r`` returned for the query (its top ``depth`` if given).
    A document a run did not return contributes 0 from it, the same as that run's
    lowest-scored document.  ``weights`` default to 1 each (e.g. ``[0.3, 0.7]``
    for BM25 and dense).
    """
    ws = _weights(runs, weights)
    fused: Run = {}
    for qid in _qids(runs):
        acc: dict[str, float] = {}
        for run, w in zip(runs, ws):
            top = dict(ranked(run.get(qid, {}), depth))
            for did, s in min_max(top).items():
                acc[did] = acc.get(did, 0.0) + w * s
        fused[qid] = acc
    return fused


def fuse(runs, method: str = "rrf", weights=None, depth: int | None = None, rrf_k: int = RRF_K) -> Run:
    """``method="rrf"`` (:func:`reciprocal_rank_fusion`) or ``"score"`` (:func:`normalized_score_fusion`)."""
    if method == "rrf":
        return reciprocal_rank_fusion(runs, k=rrf_k, weights=weights, depth=depth)
    if method == "score":
        return normalized_score_fusion(runs, weights=weights, depth=depth)
    raise InputError(f"unknown fusion {method!r}; use one of {', '.join(FUSIONS)}")
