"""Cited generation with constrained ``<cite>`` spans, on an explicit KV-cache loop.

Small models rarely write SelfCite's format on their own, so generation is guided:
``<statement>`` is forced, the statement text is free (greedy or sampled), ``<cite>``
is forced after it, and the citation body is decoded under a character grammar that
only admits ``[a-b]`` ranges with ``1 <= a <= b <= n`` (at most 3, increasing, not
adjacent), then
``</cite></statement>`` is forced.  Every citation is therefore well formed and in
range, even from a random model.

The response is kept in the tokenizer's canonical tokenization of the response text:
after each forced piece the cache is rolled back to the longest common prefix with
the canonical ids and the rest is fed again (a few tokens), so a response tokenizes
the same way here, in the reward and in TRL's SimPO trainer.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache

import torch

from tessera.attribution.format import (
    CITE_CLOSE,
    CITE_OPEN,
    MAX_SPANS,
    STATEMENT_CLOSE,
    STATEMENT_OPEN,
    CitePrompt,
    Span,
    Statement,
    attach,
    parse_citation,
    split_statements,
)
from tessera.attribution.kvcache import prefix_cache
from tessera.errors import Cancelled, ContextTooLongError
from tessera.lm.local import sample_next

CLOSE = CITE_CLOSE + STATEMENT_CLOSE
_CITE_CHARS = set("0123456789-[]") | set(CLOSE)

INVALID, OPEN, CLOSING = 0, 1, 2

StopHook = Callable[[], bool] | None


def check_stop(should_stop: StopHook, what: str = "citation decoding") -> None:
    """Cooperative cancellation: raise :class:`~tessera.errors.Cancelled` when ``should_stop()`` is true.

    Called before every model forward of cited generation, citation sampling and
    SelfCite scoring.  The hook may also raise its own exception (e.g. a server's
    request timeout), which then propagates unchanged.
    """
    if should_stop is not None and should_stop():
        raise Cancelled(f"{what} was stopped by the caller before it finished; no citations were produced")


def _number_prefix_ok(digits: str, lo: int, hi: int) -> bool:
    """Can ``digits`` be completed into a number in ``[lo, hi]`` (no leading zeros)?"""
    if not digits or (digits[0] == "0"):
        return False
    p = int(digits)
    scale = 1
    while p * scale <= hi:
        if (p + 1) * scale - 1 >= lo:
            return True
        scale *= 10
    return False


def cite_state(s: str, n: int, max_spans: int = MAX_SPANS) -> int:
    """Where ``s`` stands in the grammar ``([a-b]){1,max_spans}</cite></statement>``.

    ``INVALID``: no completion is allowed; ``OPEN``: inside the ranges;
    ``CLOSING``: the ranges are finished and ``s`` has started (or completed) the
    closing tags.  Ranges satisfy ``1 <= a <= b <= n`` and each starts at least two
    after the previous one ends (adjacent ranges would only be merged by the parser).
    """
    i, spans, prev_end, L = 0, 0, -1, len(s)  # the first range may start at 1
    while i < L:
        c = s[i]
        if c == "<" and spans >= 1:
            rest = s[i:]
            return CLOSING if CLOSE.startswith(rest) else INVALID
        if c != "[" or spans >= max_spans:
            return INVALID
        # [a
        j = i + 1
        while j < L and s[j].isdigit():
            j += 1
        a_str = s[i + 1:j]
        if j == L:
            ok = prev_end + 2 <= n if not a_str else _number_prefix_ok(a_str, prev_end + 2, n)
            return OPEN if ok else INVALID
        if not a_str or s[j] != "-":
            return INVALID
        a = int(a_str)
        if a_str[0] == "0" or not prev_end + 1 < a <= n:
            return INVALID
        # -b
        k = j + 1
        while k < L and s[k].isdigit():
            k += 1
        b_str = s[j + 1:k]
        if k == L:
            return OPEN if (not b_str or _number_prefix_ok(b_str, a, n)) else INVALID
        if not b_str or s[k] != "]":
            return INVALID
        b = int(b_str)
        if b_str[0] == "0" or not a <= b <= n:
            return INVALID
        spans, prev_end, i = spans + 1, b, k + 1
    return OPEN


@lru_cache(maxsize=8)
def _cite_vocab(tokenizer) -> tuple[tuple[int, str], ...]:
    """Tokens made only of characters that can occur in a citation body or its closing tags."""
    out = []
    for tid in range(len(tokenizer)):
        s = tokenizer.decode([tid])
        if s and set(s) <= _CITE_CHARS:
            out.append((tid, s))
    return tuple(out)


@lru_cache(maxsize=8)
def _tag_tokens(tokenizer) -> tuple[int, ...]:
    """Tokens whose text contains ``<`` or a newline (they would open a tag or end the statement)."""
    return tuple(t for t in range(len(tokenizer)) if any(c in tokenizer.decode([t]) for c in "<\n"))


def cite_vocab(tokenizer) -> tuple[tuple[int, str], ...]:
    return _cite_vocab(tokenizer)


def allowed_tokens(prefix: str, n: int, vocab, max_spans: int = MAX_SPANS) -> list[int]:
    """Token ids whose text keeps ``prefix`` a valid prefix of the citation grammar."""
    return [tid for tid, s in vocab if cite_state(prefix + s, n, max_spans) != INVALID]


@dataclass
class CitedResponse:
    """A generated (or forced) response: text, canonical token ids and statement positions.

    ``statement_tokens[j] = (start, end)``: the response tokens of statement ``j``'s
    text (SelfCite scores their mean log-probability); ``cite_tokens[j]``: the number
    of response tokens up to and including statement ``j``'s ``<cite>`` (where best-of-N
    samples).  ``token_logprobs`` are the model's log-probabilities of the response
    tokens under the full prompt (NaN where unknown).
    """

    text: str
    prompt_ids: list[int]
    response_ids: list[int]
    statements: list[Statement]
    statement_tokens: list[tuple[int, int]]
    cite_tokens: list[int]
    token_logprobs: list[float] = field(default_factory=list)
    cache: object = None
    stats: dict = field(default_factory=dict)

    def logp_full(self, j: int) -> float:
        a, b = self.statement_tokens[j]
        vals = self.token_logprobs[a:b]
        return float(sum(vals) / len(vals)) if vals and not any(math.isnan(v) for v in vals) else float("nan")


class CitedDecoder:
    """Batch-1 decoding state: ids, KV cache, last logits, per-token log-probs."""

    def __init__(self, lm, prompt_ids: list[int], should_stop: StopHook = None):
        from transformers import DynamicCache

        self.lm = lm
        self.model = lm.model
        self.tok = lm.tokenizer
        self.device = lm.device
        self.n_prompt = len(prompt_ids)
        self.ids: list[int] = []
        self.logprobs: list[float] = []
        self.cache = DynamicCache(config=self.model.config)
        self.last_logits: torch.Tensor | None = None
        self.forward_calls = 0
        self.tokens_forwarded = 0
        self.should_stop = should_stop  # checked before every forward (see check_stop)
        self.feed(prompt_ids, prefill=True)

    @torch.inference_mode()
    def feed(self, ids: list[int], prefill: bool = False) -> None:
        if not ids:
            return
        check_stop(self.should_stop)
        x = torch.tensor([ids], dtype=torch.long, device=self.device)
        out = self.model(input_ids=x, cache=self.cache, use_cache=True, logits_to_keep=1 if prefill else 0)
        self.forward_calls += 1
        self.tokens_forwarded += len(ids)
        logits = out.logits[0].float()
        if prefill:
            self.logprobs.extend([float("nan")] * len(ids))
        else:
            prev = torch.cat([self.last_logits[None], logits[:-1]], 0) if self.last_logits is not None else logits[:-1]
            vals: list[float] = []
            if prev.shape[0]:
                lp = torch.log_softmax(prev, -1)
                chosen = torch.tensor(ids[len(ids) - prev.shape[0]:], device=lp.device)
                vals = lp.gather(-1, chosen[:, None])[:, 0].tolist()
            self.logprobs.extend([float("nan")] * (len(ids) - len(vals)) + vals)
        self.ids.extend(ids)
        self.last_logits = logits[-1]

    def crop(self, length: int) -> None:
        """Keep the first ``length`` tokens (>= 1); the last one is fed again to restore its logits."""
        length = max(1, length)
        if length >= len(self.ids):
            return
        keep = length - 1
        self.cache.crop(keep - len(self.ids))
        last = self.ids[keep]
        lps = self.logprobs[:length]
        self.ids, self.logprobs = self.ids[:keep], self.logprobs[:keep]
        self.last_logits = None
        self.feed([last])
        self.logprobs[-1] = lps[-1]

    def sync(self, response_text: str) -> None:
        """Make the response part canonical: ``tokenize(response_text)``, re-feeding the differing tail."""
        target = self.n_prompt_ids() + self.encode(response_text)
        lcp = 0
        for a, b in zip(self.ids, target):
            if a != b:
                break
            lcp += 1
        if lcp < len(self.ids):
            self.crop(lcp)
        self.feed(target[len(self.ids):])

    def n_prompt_ids(self) -> list[int]:
        return self.ids[: self.n_prompt]

    def encode(self, text: str) -> list[int]:
        return list(self.tok(text, add_special_tokens=False)["input_ids"]) if text else []

    def response_ids(self) -> list[int]:
        return self.ids[self.n_prompt:]


def _statement_token_span(tokenizer, text: str, a: int, b: int) -> tuple[int, int]:
    """Response tokens overlapping characters ``[a, b)`` of ``text`` (canonical tokenization)."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    first = last = None
    for k, (s, e) in enumerate(enc["offset_mapping"]):
        if e > a and s < b:
            first = k if first is None else first
            last = k
    if first is None:
        return 0, 0
    return first, last + 1


def _tokens_up_to(tokenizer, text: str, char: int) -> int:
    """Number of canonical tokens that end at or before ``char`` (a token boundary there, or before)."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    n = 0
    for k, (s, e) in enumerate(enc["offset_mapping"]):
        if e <= char:
            n = k + 1
    return n


def _statement_done(text: str, min_words: int) -> bool:
    t = text.rstrip()
    return bool(t) and t[-1] in ".!?" and len(t.split()) >= min_words and not text.endswith(t[-1] + t[-1])


def max_cite_tokens_for(n: int, max_spans: int = MAX_SPANS) -> int:
    """Enough tokens for the longest admissible citation (one token per character, worst case)."""
    return max_spans * (2 * len(str(n)) + 3) + 2


@torch.inference_mode()
def decode_citation(dec: CitedDecoder, n: int, temperature: float = 0.0, top_p: float = 1.0,
                    generator: torch.Generator | None = None, max_spans: int = MAX_SPANS,
                    max_tokens: int | None = None) -> str:
    """Constrained decoding of one citation body after ``<cite>``; returns the body ``[a-b]...``."""
    vocab = cite_vocab(dec.tok)
    vocab_map = dict(vocab)
    body = ""
    limit = max_tokens or max_cite_tokens_for(n, max_spans)
    for _ in range(limit):
        allowed = allowed_tokens(body, n, vocab, max_spans)
        if not allowed:
            break
        logits = dec.last_logits.float()
        masked = torch.full_like(logits, float("-inf"))
        idx = torch.tensor(allowed, device=logits.device)
        masked[idx] = logits[idx]
        tid = int(sample_next(masked[None], temperature, top_p, generator)[0])
        s = vocab_map[tid]
        dec.feed([tid])
        body += s
        if cite_state(body, n, max_spans) == CLOSING:
            break
    cut = body.find("<")
    body = body[:cut] if cut >= 0 else body
    return body[: body.rfind("]") + 1] if "]" in body else ""


def generate_cited(
    lm,
    prompt: CitePrompt,
    max_new_tokens: int = 256,
    max_statements: int = 4,
    max_statement_tokens: int = 48,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    answer_statements: list[str] | None = None,
    mode: str = "answer-first",
    min_words: int = 3,
    should_stop: StopHook = None,
) -> CitedResponse:
    """Direct prompting with SelfCite's format, citations decoded under the grammar.

    ``mode="answer-first"`` (default): the model first answers in its own words under
    the same prompt; the answer's first ``max_statements`` sentences become the
    statements, each then written as ``<statement>S<cite>`` and its citation decoded.
    Small models (SmolLM2-135M) answer sensibly but cannot write the tags themselves
    (after a forced ``<statement>`` they copy the instruction's literal ``S``).
    ``mode="inline"``: the model writes each statement after a forced ``<statement>``
    (ended by a tag, a newline, a sentence end after ``min_words`` words, end of text or
    ``max_statement_tokens``), as a model trained on the format (LongCite, SelfCite)
    does.  ``answer_statements`` forces given statements.  Returns the response with its
    KV cache (prompt + response), reused by the reward and best-of-N.  ``should_stop``:
    an optional hook polled before every forward pass; when it returns true,
    :class:`~tessera.errors.Cancelled` is raised (see :func:`check_stop`).
    """
    if mode not in ("answer-first", "inline"):
        raise ValueError(f"mode must be 'answer-first' or 'inline', got {mode!r}")
    prompt_ids = prompt.ids()
    n = len(prompt.context)
    check_prompt_fits(lm, prompt, max_new_tokens)
    dec = CitedDecoder(lm, prompt_ids, should_stop)
    generator = torch.Generator(device=lm.device).manual_seed(seed) if temperature > 0 else None
    forced = list(answer_statements) if answer_statements is not None else None
    if forced is None and mode == "answer-first":
        forced = _free_answer(dec, max_new_tokens // 2, max_statements, temperature, top_p, generator)
        if not forced:  # nothing usable: fall back to inline statements
            forced = None
    text, statements = _write_statements(dec, n, forced, max_new_tokens, max_statements, max_statement_tokens,
                                         temperature, top_p, generator, min_words)
    dec.sync(text)
    return _cited_response(lm, prompt, prompt_ids, dec, text, statements)


_Written = tuple[str, list[Span], int, int, int]  # statement text, spans, char start, char end, char after <cite>


def _write_statements(dec: CitedDecoder, n: int, forced: list[str] | None, max_new_tokens: int, max_statements: int,
                      max_statement_tokens: int, temperature: float, top_p: float, generator,
                      min_words: int) -> tuple[str, list[_Written]]:
    """The statement loop of :func:`generate_cited`: the response text and what was written.

    Each statement is ``<statement>`` (forced), its text (the next of ``forced``, or
    the model's own when ``forced`` is ``None``), then its citation
    (:func:`_cite_statement`).  Stops after ``max_statements``, when the forced
    statements run out, when the token budget would not hold another cited
    statement, on an empty statement (its ``<statement>`` is taken back) or when the
    model ends its answer.
    """
    text = ""
    statements: list[_Written] = []
    finished = False
    cite_budget = max_cite_tokens_for(n)
    while not finished and len(statements) < max_statements:
        if forced is not None and not forced:
            break
        if len(dec.encode(text)) + 16 + cite_budget > max_new_tokens:
            break
        text += STATEMENT_OPEN
        dec.sync(text)
        s_char = len(text)
        if forced is not None:
            stmt = " ".join(forced.pop(0).split())
            if not forced:
                finished = True
        else:
            stmt, finished = _free_statement(dec, max_statement_tokens, temperature, top_p, generator, min_words)
        if not stmt:
            text = text[: -len(STATEMENT_OPEN)]
            dec.sync(text)
            break
        text, written = _cite_statement(dec, text, stmt, s_char, n, 0.0 if forced is not None else temperature, top_p,
                                        generator)
        statements.append(written)
        if not finished and forced is None:
            nxt = int(dec.last_logits.argmax())
            finished = nxt in dec.lm.stop_ids
    return text, statements


def _cite_statement(dec: CitedDecoder, text: str, stmt: str, s_char: int, n: int, temperature: float, top_p: float,
                    generator) -> tuple[str, _Written]:
    """Append ``stmt<cite>`` to ``text`` (which ends with ``<statement>`` at ``s_char``), decode the citation
    under the grammar and close the tags; returns the new text and the statement's record."""
    text += stmt
    e_char = len(text)
    text += CITE_OPEN
    dec.sync(text)
    c_char = len(text)
    body = decode_citation(dec, n, temperature, top_p, generator)
    spans = parse_citation(body, n)
    text += body + CLOSE
    dec.sync(text)
    return text, (stmt, spans, s_char, e_char, c_char)


def _cited_response(lm, prompt: CitePrompt, prompt_ids: list[int], dec: CitedDecoder, text: str,
                    statements: list[_Written]) -> CitedResponse:
    """The :class:`CitedResponse`: statements with their cited sentences and token positions, the KV cache, counts."""
    response_ids = dec.response_ids()
    stmt_objs, stmt_tokens, cite_tokens = [], [], []
    for stmt, spans, a, b, c in statements:
        stmt_objs.append(Statement(stmt, spans, attach(prompt.context, spans)))
        stmt_tokens.append(_statement_token_span(lm.tokenizer, text, a, b))
        cite_tokens.append(_tokens_up_to(lm.tokenizer, text, c))
    return CitedResponse(
        text=text, prompt_ids=prompt_ids, response_ids=response_ids, statements=stmt_objs,
        statement_tokens=stmt_tokens, cite_tokens=cite_tokens, token_logprobs=dec.logprobs[len(prompt_ids):],
        cache=dec.cache, stats={"forward_calls": dec.forward_calls, "tokens_forwarded": dec.tokens_forwarded,
                                "response_tokens": len(response_ids)},
    )


def _free_answer(dec: CitedDecoder, max_tokens: int, max_statements: int, temperature: float, top_p: float,
                 generator) -> list[str]:
    """The model's plain answer (stops at end of text, ``max_tokens`` or once it holds
    ``max_statements`` complete sentences), split into sentences."""
    new: list[int] = []
    text = ""
    for _ in range(max_tokens):
        logits = dec.last_logits
        if not text.strip():
            logits = logits.clone()
            logits[torch.tensor(sorted(dec.lm.stop_ids), device=logits.device)] = float("-inf")
        tid = int(sample_next(logits[None], temperature, top_p, generator)[0])
        if tid in dec.lm.stop_ids:
            break
        new.append(tid)
        dec.feed([tid])
        text = dec.tok.decode(new, skip_special_tokens=True)
        if text.rstrip()[-1:] in (".", "!", "?", "\n") and len(split_statements(text)) >= max_statements:
            break
    stmts = [_clean(x) for x in split_statements(text.replace("\n", "\n\n")) if _clean(x)]
    return stmts[:max_statements]


def _free_statement(dec: CitedDecoder, max_tokens: int, temperature: float, top_p: float,
                    generator, min_words: int) -> tuple[str, bool]:
    """Let the model write one statement; returns (statement text, answer finished)."""
    new: list[int] = []
    banned = None
    for _ in range(max_tokens):
        logits = dec.last_logits
        if not dec.tok.decode(new, skip_special_tokens=True).strip():
            # an empty statement is not an answer: no end of text or tag before the first word
            if banned is None:
                banned = torch.tensor(sorted(set(_tag_tokens(dec.tok)) | dec.lm.stop_ids), device=logits.device)
            logits = logits.clone()
            logits[banned] = float("-inf")
        tid = int(sample_next(logits[None], temperature, top_p, generator)[0])
        if tid in dec.lm.stop_ids:
            return _clean(dec.tok.decode(new, skip_special_tokens=True)), True
        new.append(tid)
        dec.feed([tid])
        piece = dec.tok.decode(new, skip_special_tokens=True).lstrip()
        cut = min((piece.index(c) for c in ("<", "\n") if c in piece), default=-1)
        if cut >= 0:
            return _clean(piece[:cut]), False
        if _statement_done(piece, min_words):
            return _clean(piece), False
    return _clean(dec.tok.decode(new, skip_special_tokens=True)), False


def _clean(s: str) -> str:
    return " ".join(s.replace("<", " ").split())


@torch.inference_mode()
def sample_citations(lm, cache, prefix_ids: list[int], n_sentences: int, n: int = 10, temperature: float = 1.2,
                     top_p: float = 0.9, max_tokens: int = 24, generator: torch.Generator | None = None,
                     max_spans: int = MAX_SPANS, should_stop: StopHook = None) -> tuple[list[str], dict]:
    """Sample ``n`` citation bodies in one batch, continuing ``prefix_ids`` (which ends with ``<cite>``).

    ``cache`` holds the KV of at least ``prefix_ids[:-1]`` (e.g. the response's cache):
    it is sliced, not modified.  SelfCite's best-of-N settings (section 3.1): N=10,
    temperature 1.2, top-p 0.9, at most 24 tokens; here each sample is also held to the
    citation grammar.  Returns the bodies (``""`` for a sample cut before its first
    range) and counts of forward calls and tokens.  ``should_stop`` is polled before
    every forward pass (see :func:`check_stop`).
    """
    vocab = cite_vocab(lm.tokenizer)
    vocab_map = dict(vocab)
    device = lm.device
    P = len(prefix_ids)
    kv = prefix_cache(cache, P - 1, 1)
    if kv is None:  # no reusable cache: run the whole prefix once
        from transformers import DynamicCache

        kv, feed = DynamicCache(config=lm.model.config), prefix_ids
    else:
        feed = prefix_ids[-1:]
    check_stop(should_stop, "best-of-N citation sampling")
    out = lm.model(input_ids=torch.tensor([feed], device=device), cache=kv, use_cache=True, logits_to_keep=1)
    stats = {"forward_calls": 1, "decode_rows": 1, "tokens_forwarded": len(feed)}
    logits = out.logits[:, -1].float().repeat(n, 1)
    kv.batch_repeat_interleave(n)
    bodies = [""] * n
    active = list(range(n))
    for _ in range(max_tokens):
        masked = torch.full_like(logits, float("-inf"))
        for r, row in enumerate(active):
            allowed = torch.tensor(allowed_tokens(bodies[row], n_sentences, vocab, max_spans), dtype=torch.long, device=device)
            masked[r, allowed] = logits[r, allowed]
        picks = sample_next(masked, temperature, top_p, generator).tolist()
        keep_rows, next_ids = [], []
        for r, (row, tid) in enumerate(zip(active, picks)):
            bodies[row] += vocab_map[tid]
            if cite_state(bodies[row], n_sentences, max_spans) != CLOSING:
                keep_rows.append(r)
                next_ids.append(tid)
        if not keep_rows:
            break
        if len(keep_rows) < len(active):
            kv.batch_select_indices(torch.tensor(keep_rows, device=device))
            active = [active[r] for r in keep_rows]
        check_stop(should_stop, "best-of-N citation sampling")
        out = lm.model(input_ids=torch.tensor(next_ids, device=device)[:, None], cache=kv, use_cache=True)
        stats["forward_calls"] += 1
        stats["decode_rows"] += len(next_ids)
        stats["tokens_forwarded"] += len(next_ids)
        logits = out.logits[:, -1].float()
    result = []
    for b in bodies:
        cut = b.find("<")
        b = b[:cut] if cut >= 0 else b
        result.append(b[: b.rfind("]") + 1] if "]" in b else "")
    return result, stats


def check_prompt_fits(lm, prompt: CitePrompt, max_new_tokens: int) -> None:
    if len(prompt) + max_new_tokens > lm.context_window:
        raise ContextTooLongError(
            f"the question with its numbered context is {len(prompt)} tokens and {max_new_tokens} more are to be "
            f"generated, but the model's context holds {lm.context_window}; shorten the context or the question"
        )
