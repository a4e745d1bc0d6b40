"""A small synthetic retrieval task a model must learn: queries and documents use different words.

Each of ``n_concepts`` concepts has a document word and a query word.  A document
names four concepts with document words; its query names two of them with query
words.  An untrained model sees no overlap between query and document tokens, so
it ranks near chance; a trained one learns the word pairs and generalises to new
combinations (the held-out split).
"""

from __future__ import annotations

import random

DOC_WORDS = ["river", "mountain", "forest", "desert", "ocean", "valley", "island", "glacier", "canyon", "meadow",
             "volcano", "lagoon", "prairie", "swamp", "tundra", "delta", "plateau", "reef", "marsh", "cliff"]
QUERY_WORDS = ["violin", "trumpet", "guitar", "piano", "flute", "drum", "cello", "harp", "banjo", "organ",
               "oboe", "tuba", "lute", "sitar", "bugle", "zither", "piccolo", "clarinet", "harmonica", "accordion"]


def make_split(n: int, rng: random.Random, seen: set) -> tuple[list[str], list[str], list[list[int]]]:
    docs, queries, concepts = [], [], []
    while len(docs) < n:
        cs = rng.sample(range(len(DOC_WORDS)), 4)
        key = tuple(sorted(cs[:2]))
        if key in seen:
            continue
        seen.add(key)
        docs.append("a report on the " + " and the ".join(DOC_WORDS[c] for c in cs))
        queries.append(" ".join(QUERY_WORDS[c] for c in cs[:2]))
        concepts.append(cs)
    return docs, queries, concepts


def synthetic_task(n_train: int = 64, n_test: int = 24, seed: int = 0):
    """``(train_rows, test)``: ReasonIR-format training rows with one hard negative, and a test
    split ``{"docs": {id: text}, "queries": {id: text}, "qrels": {qid: {did: 1}}}``."""
    rng = random.Random(seed)
    seen: set = set()
    docs, queries, concepts = make_split(n_train, rng, seen)
    rows = []
    for i in range(n_train):
        # hard negative: another document sharing a concept with the query, if any
        shared = [j for j in range(n_train) if j != i and set(concepts[j]) & set(concepts[i][:2])]
        j = rng.choice(shared) if shared else (i + 1) % n_train
        rows.append({"query": ["", queries[i]], "pos": [["", docs[i]]], "neg": [["", docs[j]]]})
    tdocs, tqueries, _ = make_split(n_test, rng, seen)
    test = {"docs": {f"d{i}": t for i, t in enumerate(tdocs)},
            "queries": {f"q{i}": t for i, t in enumerate(tqueries)},
            "qrels": {f"q{i}": {f"d{i}": 1} for i in range(n_test)}}
    return rows, test


def ndcg_at_10(model, test: dict) -> float:
    """nDCG@10 (pytrec_eval) of exact cosine search with ``encode_query`` / ``encode_document``."""
    import numpy as np
    import pytrec_eval

    dids, qids = list(test["docs"]), list(test["queries"])
    d = model.encode_document([test["docs"][i] for i in dids], normalize_embeddings=True)
    q = model.encode_query([test["queries"][i] for i in qids], normalize_embeddings=True)
    scores = np.asarray(q) @ np.asarray(d).T
    run = {qid: {did: float(s) for did, s in zip(dids, row)} for qid, row in zip(qids, scores)}
    res = pytrec_eval.RelevanceEvaluator(test["qrels"], {"ndcg_cut.10"}).evaluate(run)
    return float(np.mean([r["ndcg_cut_10"] for r in res.values()]))
