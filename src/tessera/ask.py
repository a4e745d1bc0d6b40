"""The main job: grounded answers with numbered sources.

``ask(question)`` retrieves passages from a corpus (default: Python's own
documentation topics), puts them in the prompt as numbered sources ``[1]..[k]``
and lets the LM answer from them, streaming tokens.  ``retriever`` picks BM25
(default), dense retrieval with ``encoder`` (default: the embedded
all-MiniLM-L6-v2) or their reciprocal-rank fusion ("hybrid").  ``decode="nest"``
generates with NEST over the retrieved passages (copied spans attributed to their
documents); ``cite=True`` adds SelfCite sentence-level citations to each statement
of the answer (``best_of=N`` reranks N sampled citations with the context-ablation
reward).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

from tessera.errors import ContextTooLongError, InputError
from tessera.lm.local import GenerationStats, LocalLM
from tessera.retrieval.corpus_index import PYTHON_DOCS, RETRIEVERS, CorpusIndex, Hit

if TYPE_CHECKING:
    import torch

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
    retriever: str = "bm25"
    decode: str = "greedy"
    # SelfCite statements (Statement objects) when cite=True; NEST result when decode="nest"
    statements: list = field(default_factory=list)
    nest: object = None

    def to_dict(self) -> dict:
        statements, nest = self.statements, self.nest
        self.statements, self.nest = [], None
        try:
            d = asdict(self)
        finally:
            self.statements, self.nest = statements, nest
        d["statements"] = [st.to_dict() for st in statements]
        d["nest"] = nest.to_dict() if nest is not None else None
        d["stats"]["tokens_per_s"] = self.stats.tokens_per_s
        for s, src in zip(d["sources"], self.sources):
            s["snippet"] = src.snippet
        return d


def format_sources(sources: list[Source]) -> str:
    return "\n\n".join(f"[{s.number}] {s.title}\n{s.text.strip()}" if s.title else f"[{s.number}] {s.text.strip()}" for s in sources)


def build_messages(question: str, sources: list[Source]) -> list[dict]:
    user = f"Sources:\n\n{format_sources(sources)}\n\nQuestion: {question.strip()}" if sources else f"Question: {question.strip()}"
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]


def fit_sources(lm: LocalLM, question: str, sources: list[Source], max_prompt_tokens: int) -> tuple[list[Source], torch.Tensor]:
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


# -- the stages of ask(): check, open the corpus, load the model, retrieve, fit, generate, cite ------------------


@contextmanager
def _timed(timings: dict[str, float], key: str) -> Iterator[None]:
    """Record the seconds the block takes as ``timings[key]`` (when it ends normally)."""
    t = time.perf_counter()
    yield
    timings[key] = time.perf_counter() - t


def check_request(question: str, k: int, decode: str, temperature: float, retriever: str) -> None:
    """Refuse an empty question and unknown or conflicting options (:class:`InputError`)."""
    if not question or not question.strip():
        raise InputError("the question is empty; pass a question, e.g. tessera ask \"How do I open a file?\"")
    if k < 0:
        raise InputError(f"--k must be 0 or more, got {k}")
    if decode not in ("greedy", "nest"):
        raise InputError(f"unknown --decode {decode!r}; use greedy or nest")
    if decode == "nest" and temperature > 0:
        raise InputError("--decode nest is deterministic; leave --temperature at 0")
    if retriever not in RETRIEVERS:
        raise InputError(f"unknown retriever {retriever!r}; use one of {', '.join(RETRIEVERS)}")


def open_corpus(corpus: str | CorpusIndex, retriever: str, k: int, encoder: str) -> CorpusIndex:
    """The corpus index; for dense or hybrid retrieval also its dense index and encoder, loaded (or built) up front."""
    index = corpus if isinstance(corpus, CorpusIndex) else CorpusIndex.open(corpus)
    if retriever != "bm25" and k:
        index.dense(encoder)  # load or build (and cache) the dense index and its encoder up front,
        index.encoder(encoder)  # so that retrieve_s is search time only
    return index


def sources_of(hits: list[Hit]) -> list[Source]:
    """Retrieved passages as the numbered sources of the prompt (numbered by rank)."""
    return [Source(h.rank, h.passage.doc_id, h.passage.title, h.passage.id, h.score, h.passage.text, h.passage.start,
                   h.passage.end) for h in hits]


def generate_greedy(model: LocalLM, input_ids, max_new_tokens: int, temperature: float, seed: int,
                    on_token: Callable[[str], None] | None) -> tuple[str, GenerationStats]:
    """Stream the model's answer to the prompt ``input_ids`` (greedy, or sampled at ``temperature``)."""
    stats = GenerationStats()
    pieces = []
    for piece in model.stream(input_ids, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed, stats=stats):
        pieces.append(piece)
        if on_token:
            on_token(piece)
    return "".join(pieces), stats


def generate_nest(model: LocalLM, index: CorpusIndex, question: str, input_ids, sources: list[Source],
                  max_new_tokens: int, on_token: Callable[[str], None] | None) -> tuple[str, GenerationStats, object]:
    """NEST decoding over the sources -> (answer, its stats, the NEST result with its attributed spans)."""
    from tessera.attribution.nest import nest_answer

    if not sources:
        raise InputError("--decode nest needs retrieved passages; use --k 1 or more with a corpus that matches the question")
    nest_result = nest_answer(model, index, question, input_ids, passages=sources, max_new_tokens=max_new_tokens, on_token=on_token)
    ns = nest_result.stats
    stats = GenerationStats(prompt_tokens=ns.prompt_tokens, new_tokens=ns.new_tokens, time_to_first_token_s=ns.prefill_s,
                            total_s=ns.generate_s, stop_reason=ns.stop_reason)
    return nest_result.text, stats, nest_result


def cite_statements(model: LocalLM, question: str, sources: list[Source], answer: str, best_of: int, seed: int,
                    should_stop: Callable[[], bool] | None) -> list:
    """SelfCite: the answer's statements, each with the source sentences that support it."""
    from tessera.attribution.selfcite import cite_answer

    return cite_answer(model, question, sources, best_of=best_of, answer=answer, seed=seed, should_stop=should_stop)


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
    retriever: str = "bm25",
    encoder: str = "default-encoder",
    decode: str = "greedy",
    cite: bool = False,
    best_of: int = 0,
    on_sources: Callable[[list[Source]], None] | None = None,
    on_answer: Callable[[str], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    engine: str | None = None,
    lm_url: str | None = None,
) -> AskResult:
    """Retrieve ``k`` passages, prompt the LM with them as numbered sources, stream the answer.

    ``retriever``: ``"bm25"``, ``"dense"`` (``encoder``, a sentence-transformers spec)
    or ``"hybrid"`` (reciprocal-rank fusion of both, Cormack et al. 2009).
    Callbacks for servers and UIs: ``on_sources(sources)`` once the sources that fit
    the prompt are known (before generation), ``on_token(piece)`` per decoded piece,
    ``on_answer(text)`` when generation ends (before citations are scored).  An
    exception raised in a callback stops the work and propagates (e.g. a timeout).
    ``should_stop()``: optional cooperative cancellation of the SelfCite citation phase
    (``cite=True``), polled before each of its model passes and between statements;
    once it returns true :class:`~tessera.errors.Cancelled` is raised (or whatever the
    hook raises itself propagates).  ``engine`` and ``lm_url`` (an OpenAI-compatible server that
    serves ``lm``), when ``lm`` is a spec: see :meth:`LocalLM.load`.

    The stages: :func:`check_request`, :func:`open_corpus`, load the model, search and
    :func:`sources_of`, :func:`fit_sources`, :func:`generate_greedy` or :func:`generate_nest`,
    then :func:`cite_statements` (``cite``).
    """
    check_request(question, k=k, decode=decode, temperature=temperature, retriever=retriever)
    timings: dict[str, float] = {}
    with _timed(timings, "index_s"):
        index = open_corpus(corpus, retriever=retriever, k=k, encoder=encoder)
    with _timed(timings, "load_model_s"):
        model = lm if isinstance(lm, LocalLM) else LocalLM.load(lm, engine=engine, url=lm_url)
    with _timed(timings, "retrieve_s"):
        hits: list[Hit] = index.search(question, k, retriever=retriever, encoder=encoder) if k else []
    sources = sources_of(hits)

    budget = min(max_prompt_tokens, model.context_window - max_new_tokens)
    sources, input_ids = fit_sources(model, question, sources, budget)
    if on_sources:
        on_sources(sources)

    nest_result = None
    if decode == "nest":
        answer, stats, nest_result = generate_nest(model, index, question, input_ids, sources, max_new_tokens, on_token)
    else:
        answer, stats = generate_greedy(model, input_ids, max_new_tokens, temperature, seed, on_token)
    answer = answer.strip()
    timings["generate_s"] = stats.total_s
    timings["time_to_first_token_s"] = stats.time_to_first_token_s
    if on_answer:
        on_answer(answer)

    statements = []
    if cite and sources and answer:
        with _timed(timings, "cite_s"):
            statements = cite_statements(model, question, sources, answer, best_of=best_of, seed=seed, should_stop=should_stop)
    return AskResult(question=question, answer=answer, sources=sources, model=model.name, corpus=index.name,
                     stats=stats, timings=timings, retriever=retriever, decode=decode, statements=statements, nest=nest_result)
