"""Pointwise LM reranking fused with the retriever (ReasonIR's reranker on BRIGHT).

ReasonIR (PAPERS.md) reranks the retriever's top documents with an LLM's relevance
score and averages it with the retriever's score, 0.5/0.5, after normalising both
(ReasonIR-8B on BRIGHT: 29.9 -> 36.9 nDCG@10).  Here:

- relevance (:func:`relevance_scores`): the LM is asked "Is this document relevant to
  the query? Answer Yes or No." and the score is P(Yes) / (P(Yes) + P(No)) from its
  next-token distribution (one forward pass per pair, batched);
- fusion (:func:`fuse_scores`): both score lists are min-max normalised over the
  reranked documents, final = ``w`` x retriever + ``(1 - w)`` x reranker with ``w = 0.5``;
- documents below the reranked top ``n`` keep their order under the reranked ones.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

RERANK_INSTRUCTION = "Is this document relevant to the query? Answer Yes or No."


def relevance_messages(query: str, doc: str, max_doc_words: int = 200) -> list[dict]:
    from tessera.retrieval.synth import truncate_words

    return [{"role": "user", "content": f"Query: {query}\n\nDocument: {truncate_words(doc, max_doc_words)}\n\n{RERANK_INSTRUCTION}"}]


def yes_probability(logprobs: Mapping[str, float]) -> float:
    """P(Yes) renormalised over {Yes, No}; 0.5 when neither could be scored."""
    ly, ln = logprobs.get("Yes", -math.inf), logprobs.get("No", -math.inf)
    if ly == -math.inf and ln == -math.inf:
        return 0.5
    m = max(ly, ln)
    ey, en = math.exp(ly - m), math.exp(ln - m)
    return ey / (ey + en)


def relevance_scores(backend, pairs: Sequence[tuple[str, str]], max_doc_words: int = 200) -> list[float]:
    """P(Yes) for each (query, document) pair."""
    if not pairs:
        return []
    lps = backend.next_token_logprobs([relevance_messages(q, d, max_doc_words) for q, d in pairs], ["Yes", "No"])
    return [yes_probability(lp) for lp in lps]


def minmax(scores: Mapping[str, float]) -> dict[str, float]:
    """Min-max normalisation to [0, 1]; all-equal scores map to 0.5 (no information, no preference)."""
    if not scores:
        return {}
    lo, hi = min(scores.values()), max(scores.values())
    if hi - lo <= 1e-12:
        return dict.fromkeys(scores, 0.5)
    return {d: (s - lo) / (hi - lo) for d, s in scores.items()}


def fuse_scores(retriever: Mapping[str, float], reranker: Mapping[str, float], weight: float = 0.5) -> dict[str, float]:
    """ReasonIR's fusion: ``weight * minmax(retriever) + (1 - weight) * minmax(reranker)`` over the reranked documents."""
    from tessera.errors import InputError

    if not 0.0 <= weight <= 1.0:
        raise InputError(f"the retriever weight must lie in [0, 1], got {weight}")
    docs = [d for d in retriever if d in reranker]
    r = minmax({d: retriever[d] for d in docs})
    l = minmax({d: reranker[d] for d in docs})  # noqa: E741
    return {d: weight * r[d] + (1.0 - weight) * l[d] for d in docs}


def rerank_run(run: Mapping[str, Mapping[str, float]], queries: Mapping[str, str], doc_text: Mapping[str, str], backend,
               top_n: int = 10, weight: float = 0.5, max_doc_words: int = 200) -> tuple[dict, dict]:
    """Rerank each query's top ``top_n`` documents of ``run``; returns ``(new_run, reranker_scores)``.

    Reranked documents get fused scores in [0, 1]; the rest keep their order below them
    (their scores are shifted under 0).
    """
    from tessera.retrieval.metrics import ranked

    pairs, keys = [], []
    tops = {}
    for qid, docs in run.items():
        top = ranked(docs, top_n)
        tops[qid] = top
        for d, _ in top:
            pairs.append((queries[qid], doc_text.get(d, "")))
            keys.append((qid, d))
    scores = relevance_scores(backend, pairs, max_doc_words)
    llm: dict[str, dict[str, float]] = {}
    for (qid, d), s in zip(keys, scores):
        llm.setdefault(qid, {})[d] = s
    new_run = {}
    for qid, docs in run.items():
        fused = fuse_scores(dict(tops[qid]), llm.get(qid, {}), weight)
        rest = [(d, s) for d, s in ranked(docs) if d not in fused]
        out = dict(fused)
        for i, (d, _) in enumerate(rest):
            out[d] = -1.0 - i  # below every reranked document, original order kept
        new_run[qid] = out
    return new_run, llm
