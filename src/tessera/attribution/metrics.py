"""Citation precision/recall/F1 against gold evidence sentences, and answer EM/F1.

Offline stand-in for LongBench-Cite's GPT-4o judge (PAPERS.md): on HotpotQA the gold
evidence is known exactly (``supporting_facts``), so a citation is scored by the
sentences it covers.  Per answer (the headline, HotpotQA's own "supporting fact"
metric): the union of all statements' cited sentences against the gold sentences.
Per statement: each statement's cited sentences against the same gold set, averaged
over statements (HotpotQA has no per-statement gold, so per-statement recall is lower
whenever an answer spreads its evidence over several statements).  Answer EM/F1 use
HotpotQA's official normalisation (lower case, no punctuation, no articles).
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Hashable, Iterable, Sequence


def prf(pred: Iterable[Hashable], gold: Iterable[Hashable]) -> tuple[float, float, float]:
    """Set precision, recall and F1.  Nothing predicted: precision 0 (recall 0 too unless
    there is no gold); no gold: recall 1.  F1 is 0 when precision + recall is 0."""
    p_set, g_set = set(pred), set(gold)
    hit = len(p_set & g_set)
    if not g_set:
        return (1.0, 1.0, 1.0) if not p_set else (0.0, 1.0, 0.0)
    precision = hit / len(p_set) if p_set else 0.0
    recall = hit / len(g_set)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return precision, recall, f1


def citation_scores(statements: Sequence, gold: Iterable[Hashable], key=lambda s: s.key) -> dict:
    """Citation P/R/F1 of an answer's statements against gold sentence keys.

    ``statements``: objects with ``cited`` (a list of context sentences); ``key`` maps a
    cited sentence to what ``gold`` holds (HotpotQA: ``(title, index)``).  Returns
    ``precision``/``recall``/``f1`` per answer and ``statement_*`` averages.
    """
    gold_set = set(gold)
    cited_per = [{key(c) for c in getattr(s, "cited", [])} for s in statements]
    union = set().union(*cited_per) if cited_per else set()
    p, r, f = prf(union, gold_set)
    per = [prf(c, gold_set) for c in cited_per]
    n = max(len(per), 1)
    return {
        "precision": p, "recall": r, "f1": f,
        "statement_precision": sum(x[0] for x in per) / n,
        "statement_recall": sum(x[1] for x in per) / n,
        "statement_f1": sum(x[2] for x in per) / n,
        "cited_sentences": len(union), "gold_sentences": len(gold_set), "statements": len(per),
    }


def normalize_answer(s: str) -> str:
    """HotpotQA/SQuAD normalisation: lower case, drop punctuation and articles, squeeze spaces."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def answer_em(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def answer_f1(prediction: str, gold: str) -> float:
    """Token F1 as in HotpotQA's official script (yes/no/noanswer must match exactly)."""
    pred, ref = normalize_answer(prediction), normalize_answer(gold)
    special = {"yes", "no", "noanswer"}
    if (pred in special or ref in special) and pred != ref:
        return 0.0
    p_tok, g_tok = pred.split(), ref.split()
    common = Counter(p_tok) & Counter(g_tok)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(p_tok), same / len(g_tok)
    return 2 * precision * recall / (precision + recall)


def answer_contains(prediction: str, gold: str) -> float:
    """1 when the normalised gold answer occurs in the normalised prediction (long answers)."""
    ref = normalize_answer(gold)
    return float(bool(ref) and f" {ref} " in f" {normalize_answer(prediction)} ")


def answer_scores(prediction: str, gold: str) -> dict:
    return {"em": answer_em(prediction, gold), "f1": answer_f1(prediction, gold), "contains": answer_contains(prediction, gold)}


def mean_scores(rows: Sequence[dict]) -> dict:
    """Average every numeric field over rows (missing fields are skipped)."""
    keys = sorted({k for r in rows for k, v in r.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
    out = {}
    for k in keys:
        vals = [r[k] for r in rows if isinstance(r.get(k), (int, float))]
        out[k] = sum(vals) / len(vals) if vals else 0.0
    return out
