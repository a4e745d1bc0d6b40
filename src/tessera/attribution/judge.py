"""Optional LM judge of citations, in the style of LongBench-Cite (off by default).

LongBench-Cite (used by SelfCite, section 3) asks GPT-4o (1) whether a statement's
cited text fully, partially or does not support it (recall 1 / 0.5 / 0) and (2) for
each cited sentence whether it is relevant to the statement (precision).  This module
asks the same two questions of any local judge LM (``--judge SPEC`` for users who have
a capable instruction model); with the embedded 135M model the judgments are noise,
which is why the benchmark scores against HotpotQA's gold evidence instead.
Unparseable judgments count as "no support" / "irrelevant" and are counted.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

SUPPORT_PROMPT = (
    "You are an expert in evaluating text quality. Judge whether the evidence supports the statement.\n\n"
    "Evidence:\n{evidence}\n\nStatement: {statement}\n\n"
    "Answer with exactly one of [[Fully supported]], [[Partially supported]] or [[No support]]."
)
RELEVANCE_PROMPT = (
    "You are an expert in evaluating text quality. Judge whether the sentence is relevant to the statement, "
    "that is, whether it supports at least part of it.\n\nSentence: {sentence}\n\nStatement: {statement}\n\n"
    "Answer with exactly one of [[Relevant]] or [[Irrelevant]]."
)
_SUPPORT = [(re.compile(r"fully\s+support", re.I), 1.0), (re.compile(r"partial(ly)?\s+support", re.I), 0.5),
            (re.compile(r"no\s+support|not\s+support|unsupported", re.I), 0.0)]
_RELEVANT = [(re.compile(r"irrelevant|not\s+relevant", re.I), 0.0), (re.compile(r"relevant", re.I), 1.0)]


def _first_match(text: str, rules) -> float | None:
    hits = [(m.start(), v) for rx, v in rules for m in [rx.search(text)] if m]
    return min(hits)[1] if hits else None


def parse_support(text: str) -> float | None:
    """Judge output -> 1 / 0.5 / 0, or ``None`` when it says none of the three."""
    return _first_match(text, _SUPPORT)


def parse_relevance(text: str) -> float | None:
    return _first_match(text, _RELEVANT)


def judge_citations(judge, statements: Sequence, max_new_tokens: int = 16) -> dict:
    """Citation recall, precision and F1 of ``statements`` according to ``judge`` (a LocalLM).

    ``statements`` carry ``text`` and ``cited`` (context sentences).  Recall averages
    the support score over statements (uncited statements score 0); precision averages
    relevance over all cited sentences.
    """
    def ask(prompt: str) -> str:
        ids = judge.encode_chat([{"role": "user", "content": prompt}])
        return judge.generate(ids, max_new_tokens=max_new_tokens)

    support, relevance, unparsed, calls = [], [], 0, 0
    for st in statements:
        cited = list(getattr(st, "cited", []))
        if not cited:
            support.append(0.0)
            continue
        evidence = "\n".join(" ".join(c.text.split()) for c in cited)
        v = parse_support(ask(SUPPORT_PROMPT.format(evidence=evidence, statement=st.text)))
        calls += 1
        unparsed += v is None
        support.append(v or 0.0)
        for c in cited:
            r = parse_relevance(ask(RELEVANCE_PROMPT.format(sentence=" ".join(c.text.split()), statement=st.text)))
            calls += 1
            unparsed += r is None
            relevance.append(r or 0.0)
    recall = sum(support) / len(support) if support else 0.0
    precision = sum(relevance) / len(relevance) if relevance else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return {"judge_recall": recall, "judge_precision": precision, "judge_f1": f1, "judge_unparsed": unparsed,
            "judge_calls": calls}
