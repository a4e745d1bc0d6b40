"""ContextCite (Cohen-Wang et al., 2024; PyPI ``context-cite``) as the peer method.

ContextCite ablates random subsets of the context sentences (64 ablations, each
sentence kept with probability 0.5), records the response's log-odds under each and
fits a Lasso surrogate; a sentence's weight is its attribution.  Here it attributes
the *same* statements SelfCite cites, in the same prompt (the SelfCite instruction
with ``<C{i}>`` numbered sentences), and each statement cites its ``top_k`` sentences
with a positive attribution.

Two adaptations, both outside ContextCite's algorithm:
- its default partitioner splits sentences with NLTK's punkt, whose data it tries to
  download (impossible offline); :func:`partitioner` builds a
  ``BaseContextPartitioner`` on our sentences (pysbd, or HotpotQA's own split);
- it normally generates its own response; we set the response it attributes (its
  private ``_cache["output"]``, the prompt text + response), so both methods cite the
  same statements.
"""

from __future__ import annotations

import contextlib
import io
import logging
import time
import warnings
from functools import lru_cache

from tessera.attribution.format import INSTRUCTION, CitationContext, Statement, attach, spans_from_numbers

NUM_ABLATIONS = 64      # ContextCite's default (PAPERS.md)
KEEP_PROB = 0.5         # each source kept with p=0.5
TOP_K = 3               # sentences cited per statement (SelfCite keeps at most 3 ranges)


@lru_cache(maxsize=1)
def _context_cite():
    """Import ``context_cite`` quietly (its import tries, and fails, to download NLTK's punkt)."""
    sink = io.StringIO()
    with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        import context_cite
        from context_cite.context_partitioner import BaseContextPartitioner
    return context_cite, BaseContextPartitioner


def partitioner(context: CitationContext | str):
    """A ContextCite partitioner whose sources are our numbered sentences.

    A plain string is split with pysbd (:meth:`CitationContext.from_text`).  The
    partitioner's ``context`` is the numbered text (``<C1> ...\\n<C2> ...``) and an
    ablated context keeps the original numbers, as SelfCite's ablations do.
    """
    _, Base = _context_cite()
    ctx = CitationContext.from_text(context) if isinstance(context, str) else context

    class SentencePartitioner(Base):
        def __init__(self):
            super().__init__(ctx.numbered())
            self.citation_context = ctx

        @property
        def num_sources(self) -> int:
            return len(ctx)

        def split_context(self) -> None:  # the sentences are already split
            return None

        def get_source(self, index: int) -> str:
            return ctx.sentences[index].text

        def get_context(self, mask=None) -> str:
            if mask is None:
                return ctx.numbered()
            return ctx.numbered(i + 1 for i, keep in enumerate(mask) if keep)

    return SentencePartitioner()


def contextcite_citations(lm, context: CitationContext, question: str, statements: list[str],
                          num_ablations: int = NUM_ABLATIONS, keep_prob: float = KEEP_PROB, top_k: int = TOP_K,
                          batch_size: int = 1, quiet: bool = True) -> tuple[list[Statement], dict]:
    """ContextCite attributions of ``statements`` (the response, in order) -> citations.

    Returns the statements with ``top_k`` positively attributed sentences each, and
    the cost: ``num_ablations`` forward passes over an ablated prompt + the response.
    """
    cc_mod, _ = _context_cite()
    part = partitioner(context)
    template = INSTRUCTION.replace("{", "{{").replace("}", "}}") + "\n\n[Document Start]\n{context}[Document End]\n\n{query}"
    query = " ".join(question.split())
    cc = cc_mod.ContextCiter(lm.model, lm.tokenizer, part.context, query, num_ablations=num_ablations,
                             ablation_keep_prob=keep_prob, batch_size=batch_size, prompt_template=template, partitioner=part)
    cc.logger.setLevel(logging.ERROR)
    if batch_size > 1:
        lm.tokenizer.padding_side = "left"
    response = " ".join(" ".join(s.split()) for s in statements)
    _, prompt_text = cc._get_prompt_ids(return_prompt=True)
    cc._cache["output"] = prompt_text + response
    t0 = time.perf_counter()
    out: list[Statement] = []
    sink = io.StringIO()
    redirect = contextlib.redirect_stderr(sink) if quiet else contextlib.nullcontext()
    with redirect, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pos = 0
        for s in statements:
            text = " ".join(s.split())
            a = response.find(text, pos)
            if not text or a < 0:
                out.append(Statement(text))
                continue
            b = a + len(text)
            pos = b
            scores = cc.get_attributions(start_idx=a, end_idx=b, as_dataframe=False, verbose=False)
            order = [int(i) for i in scores.argsort()[::-1] if scores[i] > 0][:top_k]
            spans = spans_from_numbers(i + 1 for i in order)
            out.append(Statement(text, spans, attach(context, spans)))
    seconds = time.perf_counter() - t0
    n_resp = len(cc._response_ids)
    tokens = sum(len(cc._get_prompt_ids(mask=m)) + n_resp for m in cc._masks)
    return out, {"forward_calls": -(-num_ablations // batch_size), "sequences": num_ablations, "tokens": tokens,
                 "seconds": seconds}
