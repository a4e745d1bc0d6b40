"""HotpotQA as a citation benchmark: contexts, gold evidence and per-example scoring.

Shared by the ``selfcite-simpo`` recipe and ``benchmarks/selfcite.py``.  The full
distractor setting has 10 paragraphs (~42 sentences, ~1,600 tokens with the prompt);
on CPU the callers keep the gold paragraphs plus a few distractors, each cut to its
first sentences (never dropping a gold sentence), and say so in their outputs.
"""

from __future__ import annotations

import time

from tessera.attribution.format import CitationContext, CitePrompt, Statement
from tessera.attribution.metrics import answer_scores, citation_scores


def hotpot_context(example, max_distractors: int = -1, max_sentences_per_paragraph: int = -1) -> CitationContext:
    """The example's numbered context; ``-1`` keeps everything (the official distractor setting)."""
    return CitationContext.from_hotpot(
        example,
        max_distractors=None if max_distractors is None or max_distractors < 0 else max_distractors,
        max_sentences_per_paragraph=None if max_sentences_per_paragraph is None or max_sentences_per_paragraph < 0
        else max_sentences_per_paragraph,
    )


def gold_keys(example) -> set[tuple[str, int]]:
    return {(t, i) for t, i in example.supporting_facts}


def score_example(example, statements: list[Statement]) -> dict:
    """Citation P/R/F1 (per answer and per statement) and answer EM/F1/contains for one example."""
    row = citation_scores(statements, gold_keys(example))
    answer = " ".join(s.text for s in statements)
    row.update({f"answer_{k}": v for k, v in answer_scores(answer, example.answer).items()})
    return row


def direct_eval(lm, examples, max_distractors: int = -1, max_sentences_per_paragraph: int = -1,
                max_statements: int = 2, max_new_tokens: int = 256, progress=None) -> list[dict]:
    """Direct prompting (citations decoded under the grammar, greedy) scored against gold evidence."""
    from tessera.attribution.constrained import generate_cited

    rows = []
    for ex in examples:
        t0 = time.perf_counter()
        ctx = hotpot_context(ex, max_distractors, max_sentences_per_paragraph)
        prompt = CitePrompt(lm.tokenizer, ctx, ex.question)
        resp = generate_cited(lm, prompt, max_new_tokens=max_new_tokens, max_statements=max_statements)
        row = score_example(ex, resp.statements)
        row.update(id=ex.id, response=resp.text, seconds=time.perf_counter() - t0)
        rows.append(row)
        if progress is not None:
            progress()
    return rows
