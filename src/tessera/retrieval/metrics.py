"""Retrieval metrics through pytrec_eval (trec_eval's own code), TREC run files.

A *run* is ``{qid: {docid: score}}`` (higher score = ranked higher) and *qrels* are
``{qid: {docid: grade}}`` with graded relevance (higher = more relevant, grades
<= 0 are non-relevant), the conventions of trec_eval and pytrec_eval.

:func:`evaluate` reports, as means over the judged queries:

- ``ndcg@10``: trec_eval's ``ndcg_cut_10`` (Järvelin & Kekäläinen 2002, nDCG with
  the grades as gains and a log2(rank + 1) discount), the main BEIR/BRIGHT figure;
- ``recall@100``: ``recall_100``, relevant documents in the top 100 over all
  relevant documents;
- ``mrr@10``: ``recip_rank`` (reciprocal rank of the first relevant document) on
  the run cut to its top 10 per query, so a first hit below rank 10 counts 0
  (MS MARCO's MRR@10).

Scale: every figure here, in Python and in the JSON files tessera writes, is in
0..1.  Papers print them x100 ("nDCG@10 of 66.5" is 0.665 here).

Which queries count: only queries with at least one judgement of grade > 0 (a
query with no relevant document has no defined nDCG or recall).  Such a query
that is missing from the run, or has an empty ranking, scores 0 on every metric;
queries in the run but not in the qrels are ignored.

Ties: documents with equal scores are ordered as trec_eval orders them, by
document id in *descending* string order.  :func:`ranked` and
:func:`write_trec_run` use the same order, so the MRR@10 cut and a TREC file
written here give the same figures when scored with ``trec_eval`` itself.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path

from tessera.errors import InputError

Run = dict[str, dict[str, float]]
Qrels = dict[str, dict[str, int]]

METRICS = ("ndcg@10", "recall@100", "mrr@10")


def ranked(scores: Mapping[str, float], k: int | None = None) -> list[tuple[str, float]]:
    """``[(docid, score)]`` best first, ties by docid descending (trec_eval's order), cut to ``k``."""
    items = sorted(scores.items(), key=lambda kv: kv[0], reverse=True)  # secondary key first (stable sort)
    items.sort(key=lambda kv: kv[1], reverse=True)
    return items if k is None else items[:k]


def truncate_run(run: Mapping[str, Mapping[str, float]], k: int) -> Run:
    """Each query's top ``k`` documents (in :func:`ranked` order)."""
    return {qid: dict(ranked(docs, k)) for qid, docs in run.items()}


def remove_excluded(run: Mapping[str, Mapping[str, float]], queries) -> Run:
    """Drop each query's excluded document ids from its ranking (BRIGHT, Su et al. 2024).

    BRIGHT lists, per query, documents that must not be retrieved (for example the
    very post a question was taken from) and removes them from the ranking before
    scoring, as its ``run.py`` does.  ``queries`` is an iterable of
    :class:`~tessera.data.types.Query` (their ``excluded_ids``) or a mapping
    ``{qid: iterable of docids}``.  Retrieve ``k`` plus the number of excluded ids
    before calling this when the ranking must keep ``k`` documents afterwards.
    """
    if isinstance(queries, Mapping):
        excluded = {str(q): set(ids) for q, ids in queries.items()}
    else:
        excluded = {q.id: set(q.excluded_ids) for q in queries}
    out: Run = {}
    for qid, docs in run.items():
        ex = excluded.get(qid)
        out[qid] = {d: s for d, s in docs.items() if d not in ex} if ex else dict(docs)
    return out


def _check_run(run) -> None:
    for qid, docs in run.items():
        for did, s in docs.items():
            if not isinstance(s, (int, float)) or not math.isfinite(float(s)):
                raise InputError(f"run score for query {qid!r}, document {did!r} is {s!r}; scores must be finite numbers")


def evaluate(run: Mapping[str, Mapping[str, float]], qrels: Mapping[str, Mapping[str, int]],
             k_ndcg: int = 10, k_recall: int = 100, k_mrr: int = 10) -> dict:
    """nDCG@k_ndcg, Recall@k_recall and MRR@k_mrr of ``run`` against ``qrels`` (pytrec_eval).

    Returns ``{"ndcg@10": mean, "recall@100": mean, "mrr@10": mean, "n_queries": n,
    "per_query": {qid: {"ndcg@10": .., "recall@100": .., "mrr@10": ..}}}`` with the
    key names following the cut-offs given.  Means are over queries with at least one
    relevant judgement (see the module docstring); figures are in 0..1.
    """
    import pytrec_eval

    for name, v in (("k_ndcg", k_ndcg), ("k_recall", k_recall), ("k_mrr", k_mrr)):
        if int(v) < 1:
            raise InputError(f"{name} must be at least 1, got {v}")
    _check_run(run)
    judged = {str(q): {str(d): int(g) for d, g in rels.items()} for q, rels in qrels.items() if any(g > 0 for g in rels.values())}
    names = (f"ndcg@{k_ndcg}", f"recall@{k_recall}", f"mrr@{k_mrr}")
    per_query = {qid: dict.fromkeys(names, 0.0) for qid in judged}
    full = {q: {str(d): float(s) for d, s in run[q].items()} for q in judged if run.get(q)}
    if full:
        ev = pytrec_eval.RelevanceEvaluator(judged, {f"ndcg_cut_{k_ndcg}", f"recall_{k_recall}"})
        for qid, m in ev.evaluate(full).items():
            per_query[qid][names[0]] = m[f"ndcg_cut_{k_ndcg}"]
            per_query[qid][names[1]] = m[f"recall_{k_recall}"]
        ev = pytrec_eval.RelevanceEvaluator(judged, {"recip_rank"})
        for qid, m in ev.evaluate(truncate_run(full, k_mrr)).items():
            per_query[qid][names[2]] = m["recip_rank"]
    n = len(per_query)
    out = {name: (sum(m[name] for m in per_query.values()) / n if n else 0.0) for name in names}
    out["n_queries"] = n
    out["per_query"] = per_query
    return out


def write_trec_run(path: str | os.PathLike, run: Mapping[str, Mapping[str, float]], tag: str = "tessera",
                   k: int | None = None) -> Path:
    """Write ``qid Q0 docid rank score tag`` lines (TREC run format), atomically.

    Queries in input order; documents in :func:`ranked` order (ties as trec_eval
    breaks them), ranks from 1.  The file is written under a temporary name and
    renamed, so a reader never sees half a run.
    """
    from tessera.config import atomic_write_text

    tag = "".join(str(tag).split()) or "tessera"
    lines: list[str] = []
    for qid, docs in run.items():
        if any(c.isspace() for c in qid):
            raise InputError(f"query id {qid!r} contains whitespace; TREC run files need ids without spaces")
        for rank, (did, score) in enumerate(ranked(docs, k), 1):
            if any(c.isspace() for c in did):
                raise InputError(f"document id {did!r} contains whitespace; TREC run files need ids without spaces")
            lines.append(f"{qid} Q0 {did} {rank} {float(score):.6f} {tag}\n")
    atomic_write_text(path, "".join(lines))
    return Path(path)


def read_trec_run(path: str | os.PathLike) -> Run:
    """A TREC run file back into ``{qid: {docid: score}}``."""
    from tessera.data.jsonl import read_text
    from tessera.errors import DataFormatError

    run: Run = {}
    for lineno, line in enumerate(read_text(path).split("\n"), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 6:
            raise DataFormatError(path, lineno, f"expected 6 columns (qid Q0 docid rank score tag), got {len(parts)}", hint="pass a TREC run file")
        try:
            run.setdefault(parts[0], {})[parts[2]] = float(parts[4])
        except ValueError:
            raise DataFormatError(path, lineno, f"score {parts[4]!r} is not a number", hint="pass a TREC run file") from None
    return run

