"""SelfCite's citation format: numbered context sentences, the prompt, and a lenient parser.

The context is split into sentences numbered ``<C1>``, ``<C2>``, ... and the model
answers with statements ``<statement>S<cite>[i-j][k-l]</cite></statement>``
(SelfCite, Chuang et al. 2025, section 2 and appendix, following LongCite's format).
One difference from the public code: numbers start at 1 here (LongCite counts from 0).

:func:`parse_citation` follows the official post-processing: ranges ``[a-b]`` are
read in order, a range that starts past the last sentence or ends before it starts is
dropped, the end is clamped to the last sentence, adjacent ranges are merged and at
most 3 are kept.  It is lenient on top of that (``[5]`` reads as ``[5-5]``,
``[C3-C4]`` as ``[3-4]``, overlapping ranges merge too) and counts every repair in
:class:`ParseStats`; nothing it is given makes it raise.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field

from tessera.errors import InputError

MAX_SPANS = 3  # SelfCite/LongCite post-processing keeps the first 3 merged ranges

INSTRUCTION = (
    "Please answer the user's question based on the following document. When a sentence S in your response "
    "uses information from some chunks in the document (i.e., <C{s1}>-<C{e1}>, <C{s2}>-<C{e2}>, ...), please "
    "append these chunk numbers to S in the format \"<statement>{S}<cite>[{s1}-{e1}][{s2}-{e2}]...</cite></statement>\". "
    "You must answer in the same language as the user's question."
)
"""The LongCite/SelfCite instruction (SelfCite's public code, ``get_prompt``), verbatim."""

STATEMENT_OPEN, STATEMENT_CLOSE = "<statement>", "</statement>"
CITE_OPEN, CITE_CLOSE = "<cite>", "</cite>"

Span = tuple[int, int]


@dataclass(frozen=True)
class ContextSentence:
    """One numbered context sentence and where it came from.

    ``number`` is the ``<C{number}>`` label (1-based).  ``doc_id``/``title`` name the
    source document and ``start``/``end`` are character offsets into that document's
    text; ``source`` is the number of the retrieved passage it came from (``tessera
    ask``'s ``[k]``), ``key`` an evaluation key such as HotpotQA's ``(title, index)``.
    """

    number: int
    text: str
    doc_id: str = ""
    title: str = ""
    start: int = 0
    end: int = 0
    source: int | None = None
    key: tuple | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["key"] = list(self.key) if self.key is not None else None
        return d


class CitationContext:
    """A list of numbered sentences: what the model reads and cites."""

    def __init__(self, sentences: Sequence[ContextSentence]):
        self.sentences = list(sentences)
        for i, s in enumerate(self.sentences, 1):
            if s.number != i:
                raise ValueError(f"sentence numbers must run 1..n in order; got {s.number} at position {i}")

    def __len__(self) -> int:
        return len(self.sentences)

    def __getitem__(self, number: int) -> ContextSentence:
        """The sentence labelled ``<C{number}>`` (1-based)."""
        return self.sentences[number - 1]

    def line(self, number: int) -> str:
        """The prompt line of one sentence: ``<C3> text``."""
        return f"<C{number}> {' '.join(self[number].text.split())}\n"

    def numbered(self, keep: Iterable[int] | None = None) -> str:
        """The numbered context, optionally only the sentences in ``keep`` (original numbers kept)."""
        keep_set = None if keep is None else set(keep)
        return "".join(self.line(s.number) for s in self.sentences if keep_set is None or s.number in keep_set)

    # -- builders -------------------------------------------------------------------
    @classmethod
    def from_text(cls, text: str, doc_id: str = "context", title: str = "") -> "CitationContext":
        """Split ``text`` into sentences with pysbd (no download) and keep their character spans."""
        from tessera.data.chunking import split_sentences

        if not text or not text.strip():
            raise InputError("the context is empty; pass a file with the text to cite from")
        spans = split_sentences(text)
        return cls([ContextSentence(i, text[a:b], doc_id, title, a, b) for i, (a, b) in enumerate(spans, 1)])

    @classmethod
    def from_passages(cls, passages: Sequence) -> "CitationContext":
        """Sentences of retrieved passages, each mapped back to its document.

        A passage is any object (or dict) with ``text``, ``doc_id`` and ``start`` (the
        passage's character offset in its document), optionally ``title`` and
        ``number`` (the ``[k]`` it had in the answer prompt): ``tessera.ask.Source``,
        ``tessera.data.chunking.Passage`` and plain dicts all work.
        """
        from tessera.data.chunking import split_sentences

        out: list[ContextSentence] = []
        for k, p in enumerate(passages, 1):
            get = p.get if isinstance(p, dict) else (lambda name, default=None, _p=p: getattr(_p, name, default))
            text = get("text", "") or ""
            base = int(get("start", 0) or 0)
            number = get("number", None)
            for a, b in split_sentences(text):
                out.append(ContextSentence(len(out) + 1, text[a:b], str(get("doc_id", "") or ""), str(get("title", "") or ""),
                                           base + a, base + b, int(number) if number is not None else k))
        if not out:
            raise InputError("the passages hold no text to cite; retrieve at least one non-empty passage")
        return cls(out)

    @classmethod
    def from_hotpot(cls, example, max_distractors: int | None = None, max_sentences_per_paragraph: int | None = None) -> "CitationContext":
        """HotpotQA's own sentence split, numbered in paragraph order; ``key = (title, index)``.

        ``max_distractors`` keeps the gold paragraphs and only the first that many
        distractor paragraphs; ``max_sentences_per_paragraph`` cuts each paragraph after
        that many sentences but never drops a gold sentence.  Both default to the full
        distractor setting (10 paragraphs); the benchmark scales them down for CPU.
        ``start``/``end`` are offsets into the paragraph text ``"".join(sentences)``.
        """
        gold = {(t, i) for t, i in example.supporting_facts}
        gold_titles = {t for t, _ in gold}
        out: list[ContextSentence] = []
        distractors = 0
        for title, sents in example.context:
            if title not in gold_titles:
                if max_distractors is not None and distractors >= max_distractors:
                    continue
                distractors += 1
            last_gold = max((i for t, i in gold if t == title), default=-1)
            limit = len(sents) if max_sentences_per_paragraph is None else max(max_sentences_per_paragraph, last_gold + 1)
            offset = 0
            for i, s in enumerate(sents):
                a, b = offset, offset + len(s)
                offset = b
                if i >= limit or not s.strip():
                    continue
                lead = len(s) - len(s.lstrip())
                out.append(ContextSentence(len(out) + 1, s.strip(), title, title, a + lead, a + lead + len(s.strip()), None, (title, i)))
        if not out:
            raise InputError(f"HotpotQA example {example.id} has no context sentences")
        return cls(out)


@dataclass
class Statement:
    """One statement of an answer and its citations.

    ``spans`` are merged ``(start, end)`` sentence-number ranges (inclusive);
    ``cited`` the cited :class:`ContextSentence` objects (with their documents and
    character offsets).  ``reward``, ``prob_drop`` and ``prob_hold`` are SelfCite's
    scores of the citation (section 2.2) when it was scored.
    """

    text: str
    spans: list[Span] = field(default_factory=list)
    cited: list[ContextSentence] = field(default_factory=list)
    reward: float | None = None
    prob_drop: float | None = None
    prob_hold: float | None = None

    @property
    def numbers(self) -> list[int]:
        return span_numbers(self.spans)

    @property
    def cite_text(self) -> str:
        return format_spans(self.spans)

    def to_dict(self) -> dict:
        return {"text": self.text, "citation": self.cite_text, "spans": [list(s) for s in self.spans],
                "cited": [s.to_dict() for s in self.cited], "reward": self.reward,
                "prob_drop": self.prob_drop, "prob_hold": self.prob_hold}


def span_numbers(spans: Iterable[Span]) -> list[int]:
    """Sorted sentence numbers covered by ``spans``."""
    return sorted({i for a, b in spans for i in range(a, b + 1)})


def spans_from_numbers(numbers: Iterable[int]) -> list[Span]:
    """Sentence numbers -> sorted maximal runs ``[(a, b), ...]``."""
    out: list[Span] = []
    for i in sorted(set(numbers)):
        if out and i == out[-1][1] + 1:
            out[-1] = (out[-1][0], i)
        else:
            out.append((i, i))
    return out


def format_spans(spans: Iterable[Span]) -> str:
    return "".join(f"[{a}-{b}]" for a, b in spans)


def format_statement(text: str, spans: Iterable[Span]) -> str:
    return f"{STATEMENT_OPEN}{text}{CITE_OPEN}{format_spans(spans)}{CITE_CLOSE}{STATEMENT_CLOSE}"


def format_response(statements: Iterable[Statement | tuple[str, list[Span]]]) -> str:
    """Statements -> ``<statement>S<cite>[a-b]</cite></statement>...`` (no separator)."""
    parts = []
    for s in statements:
        text, spans = (s.text, s.spans) if isinstance(s, Statement) else s
        parts.append(format_statement(text, spans))
    return "".join(parts)


def split_statements(answer: str) -> list[str]:
    """An answer's sentences (pysbd), the statements to cite."""
    from tessera.data.chunking import split_sentences

    return [" ".join(answer[a:b].split()) for a, b in split_sentences(answer)]


@dataclass
class ParseStats:
    """Counts of what the lenient parser repaired or dropped (all 0 for well-formed output)."""

    statements: int = 0
    spans: int = 0
    singletons: int = 0       # "[5]" read as "[5-5]"
    prefixed: int = 0         # "[C5-C6]" read as "[5-6]"
    out_of_range: int = 0     # start past the last sentence (dropped) or end clamped / start < 1 raised
    reversed: int = 0         # end before start (dropped, as in SelfCite's code)
    merged: int = 0           # adjacent or overlapping ranges merged into the previous one
    truncated: int = 0        # ranges beyond the first 3 after merging
    garbage: int = 0          # non-range text inside <cite>...</cite>
    unclosed: int = 0         # <statement> or <cite> without its closing tag
    untagged: int = 0         # answer text outside any <statement>, kept as uncited statements
    no_citation: int = 0      # statements without a <cite> block

    def add(self, other: "ParseStats") -> "ParseStats":
        for k, v in asdict(other).items():
            setattr(self, k, getattr(self, k) + v)
        return self

    @property
    def repairs(self) -> int:
        d = asdict(self)
        return sum(v for k, v in d.items() if k not in ("statements", "spans"))

    def to_dict(self) -> dict:
        return asdict(self)


_RANGE = re.compile(r"\[\s*[Cc]?\s*(\d+)\s*(?:[-\u2013~:,]\s*[Cc]?\s*(\d+)\s*)?\]")
_PREFIXED = re.compile(r"\[\s*[Cc]")


def parse_citation(cite_text: str, n_sentences: int, max_spans: int = MAX_SPANS, stats: ParseStats | None = None) -> list[Span]:
    """The body of one ``<cite>...</cite>`` -> merged, in-range spans (at most ``max_spans``).

    Official rules (SelfCite's ``get_citations``): ranges in order of appearance; drop a
    range whose start is past the last sentence or whose end is before its start; clamp
    the end to the last sentence; merge a range into the previous one when it starts
    right after it; keep the first 3.  Lenient additions, each counted in ``stats``:
    ``[k]`` -> ``[k-k]``, ``C`` prefixes, overlapping ranges merged, start < 1 raised to 1.
    """
    stats = stats if stats is not None else ParseStats()
    merged: list[Span] = []
    leftover = _RANGE.sub("", cite_text)
    if leftover.strip():
        stats.garbage += 1
    for m in _RANGE.finditer(cite_text):
        a = int(m.group(1))
        b = int(m.group(2)) if m.group(2) is not None else a
        if m.group(2) is None:
            stats.singletons += 1
        if _PREFIXED.match(m.group(0)):
            stats.prefixed += 1
        if b < a:
            stats.reversed += 1
            continue
        if a > n_sentences or b < 1:
            stats.out_of_range += 1
            continue
        if a < 1 or b > n_sentences:
            stats.out_of_range += 1
            a, b = max(a, 1), min(b, n_sentences)
        if merged and merged[-1][0] <= a <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(merged[-1][1], b))
            stats.merged += 1
            continue
        merged.append((a, b))
    if len(merged) > max_spans:
        stats.truncated += len(merged) - max_spans
        merged = merged[:max_spans]
    stats.spans += len(merged)
    return merged


_STATEMENT = re.compile(r"<statement>(.*?)(?:</statement>|(?=<statement>)|\Z)", re.DOTALL)
_CITE = re.compile(r"<cite>(.*?)(?:</cite>|\Z)", re.DOTALL)
_TAG = re.compile(r"</?(?:statement|cite)>")


@dataclass
class ParsedResponse:
    statements: list[Statement]
    stats: ParseStats


def parse_response(text: str, context: CitationContext | int, max_spans: int = MAX_SPANS) -> ParsedResponse:
    """A model's answer -> statements with parsed citations; never raises.

    ``context`` is the :class:`CitationContext` (cited sentences are attached) or just
    its sentence count.  Text outside ``<statement>`` tags becomes uncited statements
    (counted as ``untagged``); a missing ``</cite>`` or ``</statement>`` is tolerated
    (counted as ``unclosed``).
    """
    stats = ParseStats()
    n = context if isinstance(context, int) else len(context)
    ctx = None if isinstance(context, int) else context
    text = text if isinstance(text, str) else ""
    statements: list[Statement] = []
    pos = 0

    def add_untagged(chunk: str) -> None:
        chunk = _TAG.sub(" ", chunk)
        chunk = " ".join(chunk.split())
        if chunk:
            stats.untagged += 1
            statements.append(Statement(chunk))

    for m in _STATEMENT.finditer(text):
        add_untagged(text[pos:m.start()])
        pos = m.end()
        body = m.group(1)
        if not m.group(0).endswith(STATEMENT_CLOSE):
            stats.unclosed += 1
        c = _CITE.search(body)
        if c is None:
            stats.no_citation += 1
            stmt_text, spans = body, []
        else:
            if not c.group(0).endswith(CITE_CLOSE):
                stats.unclosed += 1
            stmt_text = body[:c.start()] + body[c.end():]
            spans = parse_citation(c.group(1), n, max_spans, stats)
        stmt_text = " ".join(_TAG.sub(" ", stmt_text).split())
        if not stmt_text and not spans:
            continue
        stats.statements += 1
        statements.append(Statement(stmt_text, spans, attach(ctx, spans)))
    add_untagged(text[pos:])
    return ParsedResponse(statements, stats)


def attach(context: CitationContext | None, spans: Iterable[Span]) -> list[ContextSentence]:
    """The context sentences covered by ``spans`` (empty without a context)."""
    if context is None:
        return []
    return [context[i] for i in span_numbers(spans) if 1 <= i <= len(context)]


class CitePrompt:
    """The chat prompt around a numbered context, as token segments that can be ablated.

    ``ids(keep)`` is ``head + line(i) for i in keep + tail``: the same prompt with only
    some sentences, numbers unchanged (SelfCite section 2.2: context ablation keeps the
    original chunk labels).  Segments are tokenized separately, so every ablated prompt
    shares its token prefix with the full one up to the first removed sentence; that is
    what lets the reward reuse the full prompt's KV cache.
    """

    def __init__(self, tokenizer, context: CitationContext, question: str, instruction: str = INSTRUCTION):
        if not question or not question.strip():
            raise InputError("the question is empty; pass --question \"...\"")
        self.tokenizer = tokenizer
        self.context = context
        self.question = " ".join(question.split())
        self.instruction = instruction
        self.before, self.after = chat_frame(tokenizer)
        head_text = self.before + self.instruction + "\n\n[Document Start]\n"
        tail_text = "[Document End]\n\n" + self.question + self.after
        enc = lambda s: list(tokenizer(s, add_special_tokens=False)["input_ids"])  # noqa: E731
        self.head_ids = enc(head_text)
        self.sentence_ids = [enc(context.line(s.number)) for s in context.sentences]
        self.tail_ids = enc(tail_text)
        self.sentence_text_tokens = [len(enc(s.text)) for s in context.sentences]

    def user_content(self, numbered_context: str) -> str:
        return f"{self.instruction}\n\n[Document Start]\n{numbered_context}[Document End]\n\n{self.question}"

    def ids(self, keep: Iterable[int] | None = None) -> list[int]:
        keep_set = None if keep is None else set(keep)
        out = list(self.head_ids)
        for s in self.context.sentences:
            if keep_set is None or s.number in keep_set:
                out.extend(self.sentence_ids[s.number - 1])
        return out + self.tail_ids

    def __len__(self) -> int:
        return len(self.head_ids) + sum(map(len, self.sentence_ids)) + len(self.tail_ids)

    def shared_prefix(self, first_dropped: int) -> int:
        """Tokens the full prompt shares with any prompt that keeps sentences ``< first_dropped``."""
        return len(self.head_ids) + sum(len(x) for x in self.sentence_ids[: first_dropped - 1])

    def text(self, keep: Iterable[int] | None = None) -> str:
        """The prompt as text (chat template applied), e.g. for TRL's ``prompt`` column."""
        return self.before + self.user_content(self.context.numbered(keep)) + self.after

    def cited_tokens(self, numbers: Iterable[int]) -> int:
        """Tokens of the cited sentences' text (SelfCite's length limit counts these)."""
        return sum(self.sentence_text_tokens[i - 1] for i in set(numbers) if 1 <= i <= len(self.sentence_text_tokens))


_SENTINEL = "\u2063TESSERA_CONTENT\u2063"


def chat_frame(tokenizer) -> tuple[str, str]:
    """The chat template's text before and after a single user message's content
    (generation prompt included); ``user: ... assistant:`` for tokenizers without one."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": _SENTINEL}], tokenize=False, add_generation_prompt=True)
        if _SENTINEL in text:
            before, after = text.split(_SENTINEL, 1)
            return before, after
    return "user: ", "\n\nassistant:"
