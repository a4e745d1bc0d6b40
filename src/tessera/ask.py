"""The main job: grounded answers with numbered sources.

``ask(question)`` retrieves passages from a corpus (default: Python's own
documentation topics), puts them in the prompt as numbered sources ``[1]..[k]``
and lets the LM answer from them, streaming tokens.  Later methods plug in here:
dense/hybrid retrieval, SelfCite citations and NEST decoding.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from tessera.errors import ContextTooLongError, InputError
from tessera.lm.local import GenerationStats, LocalLM
from tessera.retrieval.corpus_index import PYTHON_DOCS, CorpusIndex, Hit

SYSTEM_PROMPT = (
    "You answer questions using only the numbered sources given. "
    "Cite the sources you use with their numbers in brackets, like [1]. "
    "If the sources do not contain the answer, say so."
)


@dataclass
class Source:
    number: int
    doc_id: str
    title: str
    passage_id: str
    score: float
    text: str
    start: int
    end: int

    @property
    def snippet(self) -> str:
        flat = " ".join(self.text.split())
        return flat if len(flat) <= 160 else flat[:157].rsplit(" ", 1)[0] + "..."


@dataclass
class AskResult:
    question: str
    answer: str
    sources: list[Source]
    model: str
    corpus: str
    stats: GenerationStats = field(default_factory=GenerationStats)
    timings: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["stats"]["tokens_per_s"] = self.stats.tokens_per_s
        for s, src in zip(d["sources"], self.sources):
            s["snippet"] = src.snippet
        return d


def format_sources(sources: list[Source]) -> str:
    return "\n\n".join(f"[{s.number}] {s.title}\n{s.text.strip()}" if s.title else f"[{s.number}] {s.text.strip()}" for s in sources)


def build_messages(question: str, sources: list[Source]) -> list[dict]:
    user = f"Sources:\n\n{format_sources(sources)}\n\nQuestion: {question.strip()}" if sources else f"Question: {question.strip()}"
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]


def fit_sources(lm: LocalLM, question: str, sources: list[Source], max_prompt_tokens: int) -> tuple[list[Source], "torch.Tensor"]:  # noqa: F821
    """Drop trailing sources (then trim the last one) until the prompt fits ``max_prompt_tokens``.

    Raises :class:`ContextTooLongError` when the question alone does not fit.
    """
    bare = lm.encode_chat(build_messages(question, []))
    if bare.shape[1] > max_prompt_tokens:
        raise ContextTooLongError(
            f"the question is {bare.shape[1]} tokens with the prompt, more than the {max_prompt_tokens} the model's context leaves; "
            "shorten the question (or lower --max-new-tokens)"
        )
    kept = list(sources)
    while kept:
        ids = lm.encode_chat(build_messages(question, kept))
        excess = ids.shape[1] - max_prompt_tokens
        if excess <= 0:
            return kept, ids
        last = kept[-1]
        last_tokens = lm.count_tokens(last.text)
        if len(kept) > 1 and excess >= last_tokens:
            kept.pop()
            continue
        keep_tokens = max(0, last_tokens - excess - 8)
        if keep_tokens < 16:
            kept.pop()
            continue
        ids_text = lm.tokenizer(last.text, add_special_tokens=False)["input_ids"][:keep_tokens]
        text = lm.tokenizer.decode(ids_text)
        kept[-1] = Source(**{**asdict(last), "text": text, "end": last.start + len(text)})
    return [], bare


def ask(
    question: str,
    corpus: str | CorpusIndex = PYTHON_DOCS,
    lm: str | LocalLM = "default",
    k: int = 3,
    max_new_tokens: int = 256,
    max_prompt_tokens: int = 2048,
    temperature: float = 0.0,
    seed: int = 0,
    on_token: Callable[[str], None] | None = None,
) -> AskResult:
    """Retrieve ``k`` passages, prompt the LM with them as numbered sources, stream the answer."""
    if not question or not question.strip():
        raise InputError("the question is empty; pass a question, e.g. tessera ask \"How do I open a file?\"")
    if k < 0:
        raise InputError(f"--k must be 0 or more, got {k}")
    timings: dict[str, float] = {}
    t = time.perf_counter()
    index = corpus if isinstance(corpus, CorpusIndex) else CorpusIndex.open(corpus)
    timings["index_s"] = time.perf_counter() - t

    t = time.perf_counter()
    model = lm if isinstance(lm, LocalLM) else LocalLM.load(lm)
    timings["load_model_s"] = time.perf_counter() - t

    t = time.perf_counter()
    hits: list[Hit] = index.search(question, k) if k else []
    timings["retrieve_s"] = time.perf_counter() - t
    sources = [Source(h.rank, h.passage.doc_id, h.passage.title, h.passage.id, h.score, h.passage.text, h.passage.start, h.passage.end) for h in hits]

    budget = min(max_prompt_tokens, model.context_window - max_new_tokens)
    sources, input_ids = fit_sources(model, question, sources, budget)

    stats = GenerationStats()
    pieces = []
    for piece in model.stream(input_ids, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed, stats=stats):
        pieces.append(piece)
        if on_token:
            on_token(piece)
    timings["generate_s"] = stats.total_s
    timings["time_to_first_token_s"] = stats.time_to_first_token_s
    return AskResult(question=question, answer="".join(pieces).strip(), sources=sources, model=model.name,
                     corpus=index.name, stats=stats, timings=timings)
