"""SelfCite's context-ablation reward, best-of-N citation sampling and a reward-only span search.

SelfCite (Chuang et al., ICML 2025, arXiv 2502.09604), section 2.2: for a statement
``r`` with citation ``E`` (a set of context sentences), with the response before the
statement always kept in front of it,

- necessity, ``prob_drop(E) = log p(r | C) - log p(r | C \\ E)``;
- sufficiency, ``prob_hold(E) = log p(r | E) - log p(r | C)``;
- final reward ``prob_drop + prob_hold = log p(r | E) - log p(r | C \\ E)``.

As in the official code, ``log p`` is the *mean* per-token log-probability of the
statement's tokens, and a citation whose cited text exceeds 384 tokens while citing
more than one sentence gets -1000.

Cost on CPU is dominated by the ablated-context passes, so the scorer reuses the KV
cache of the full prompt + response (which generation already computed): a prompt
that drops sentences ``E`` shares its token prefix with the full prompt up to the
first dropped sentence, and every "only E" prompt shares the instruction header.
Only the remaining suffix is run, in batches of rows that share a prefix.  Models
whose cache is not a plain :class:`~transformers.DynamicCache` (e.g. sliding-window
layers) are scored with full forward passes instead.

Every entry point takes an optional ``should_stop`` hook (cooperative cancellation,
e.g. a server's request deadline): it is polled before every model forward pass of
generation, best-of-N sampling and scoring, and between statements; when it returns
true :class:`~tessera.errors.Cancelled` is raised (an exception the hook raises itself
propagates unchanged).  Without it nothing changes.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from tessera.attribution.constrained import CitedResponse, StopHook, check_stop, generate_cited, sample_citations
from tessera.attribution.format import (
    MAX_SPANS,
    CitePrompt,
    ParseStats,
    Span,
    Statement,
    attach,
    format_response,
    parse_citation,
    span_numbers,
    spans_from_numbers,
    split_statements,
)
from tessera.attribution.kvcache import plain_dynamic, prefix_cache

LENGTH_LIMIT = 384  # SelfCite: cited text longer than this (tokens) with > 1 sentence is penalised
LENGTH_PENALTY = 1000.0

# SelfCite section 2.3 "Best-of-N Sampling" (settings from the official code):
# N=10 samples per <cite>, temperature 1.2, top-p 0.9, <= 24 tokens.
BEST_OF_N = 10
BON_TEMPERATURE = 1.2
BON_TOP_P = 0.9
BON_MAX_TOKENS = 24


def prob_drop(logp_full: float, logp_removed: float) -> float:
    """Necessity score (SelfCite section 2.2, "Probability Drop"): ``log p(r|C) - log p(r|C \\ E)``."""
    return logp_full - logp_removed


def prob_hold(logp_hold: float, logp_full: float) -> float:
    """Sufficiency score (SelfCite section 2.2, "Probability Hold"): ``log p(r|E) - log p(r|C)``."""
    return logp_hold - logp_full


def selfcite_reward(drop: float, hold: float, cited_tokens: int = 0, n_cited: int = 0,
                    length_limit: int = LENGTH_LIMIT, penalty: float = LENGTH_PENALTY) -> float:
    """Final reward (SelfCite section 2.2): ``prob_drop + prob_hold``, minus ``penalty`` when the
    cited text exceeds ``length_limit`` tokens and more than one sentence is cited (official code)."""
    r = drop + hold
    if length_limit and cited_tokens > length_limit and n_cited > 1:
        r -= penalty
    return r


@dataclass
class CitationScore:
    """SelfCite's scores of one citation of one statement (log-probs are per-token means)."""

    spans: list[Span]
    logp_full: float
    logp_removed: float
    logp_hold: float
    prob_drop: float
    prob_hold: float
    reward: float
    cited_tokens: int = 0
    penalized: bool = False

    def to_dict(self) -> dict:
        return {"spans": [list(s) for s in self.spans], "logp_full": self.logp_full, "logp_removed": self.logp_removed,
                "logp_hold": self.logp_hold, "prob_drop": self.prob_drop, "prob_hold": self.prob_hold,
                "reward": self.reward, "cited_tokens": self.cited_tokens, "penalized": self.penalized}


@dataclass
class ScoreStats:
    """Compute spent: model calls, sequences scored (rows) and tokens actually run."""

    forward_calls: int = 0
    sequences: int = 0
    tokens: int = 0
    seconds: float = 0.0

    def add(self, other: "ScoreStats | dict") -> "ScoreStats":
        d = other if isinstance(other, dict) else other.__dict__
        for k in ("forward_calls", "sequences", "tokens", "seconds"):
            setattr(self, k, getattr(self, k) + d.get(k, 0))
        return self

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@torch.inference_mode()
def mean_token_logprob(model, ids: Sequence[int], n_last: int) -> float:
    """Mean log-probability of the last ``n_last`` tokens of ``ids``: one full forward pass, no cache.

    The direct computation the cached scorer is tested against.
    """
    device = next(model.parameters()).device
    x = torch.tensor([list(ids)], dtype=torch.long, device=device)
    logits = model(input_ids=x).logits[0, -n_last - 1:-1].float()
    lp = torch.log_softmax(logits, -1).gather(-1, x[0, -n_last:, None])[:, 0]
    return float(lp.mean())


class SelfCiteScorer:
    """Scores citations of a response's statements with SelfCite's reward.

    ``response`` is a :class:`CitedResponse` (its cache, when present, is reused);
    statement ``j`` is scored on ``prompt + response_ids[:end_j]``, measuring the
    tokens of statement ``j``.  ``stats`` counts model calls, rows and tokens.
    ``should_stop`` is polled before every scoring pass (see the module docstring).
    """

    def __init__(self, lm, prompt: CitePrompt, response: CitedResponse, length_limit: int = LENGTH_LIMIT,
                 batch_size: int = 8, reuse_cache: bool = True, should_stop: StopHook = None):
        self.lm = lm
        self.model = lm.model
        self.prompt = prompt
        self.response = response
        self.length_limit = length_limit
        self.batch_size = max(1, batch_size)
        self.reuse_cache = reuse_cache
        self.should_stop = should_stop
        self.stats = ScoreStats()
        self._base = response.cache if reuse_cache and plain_dynamic(response.cache) else None
        self._full: dict[int, float] = {}
        self._memo: dict[tuple[int, tuple[int, ...]], CitationScore] = {}

    # -- log-probabilities -------------------------------------------------------------
    def logp_full(self, j: int) -> float:
        """Mean log-prob of statement ``j`` under the full context (from generation when known)."""
        if j not in self._full:
            val = self.response.logp_full(j)
            if math.isnan(val):
                a, b = self.response.statement_tokens[j]
                rows = [(0, self.prompt.ids() + self.response.response_ids[:b], b - a)]
                val = self._run(rows)[0]
            self._full[j] = val
        return self._full[j]

    def _run(self, rows: list[tuple[int, list[int], int]]) -> list[float]:
        """Mean log-prob of the last ``n`` tokens of each ``(prefix_len, ids, n)`` row."""
        if getattr(self.lm, "engine", "hf") == "tessera":
            return self._run_engine(rows)
        return self._run_hf(rows)

    def _run_engine(self, rows: list[tuple[int, list[int], int]]) -> list[float]:
        """Through :func:`tessera.lm.engine.score_rows`: the full prompt is the anchor (its KV taken from
        generation's cache when there is one, else run once); every row reuses its common prefix with it, and
        rows of different prefix lengths share a batch."""
        from tessera.lm.engine import KVBuffer, anchor_kv, score_rows

        t0 = time.perf_counter()
        if not hasattr(self, "_anchor"):  # the full prompt: every ablated row shares a prefix with it
            full = self.prompt.ids()
            n_cached = min(self._base.get_seq_length(), len(full)) if self._base is not None else 0
            buf = KVBuffer.from_cache(self.model, self._base, n_cached) if n_cached else None
            if buf is None:
                check_stop(self.should_stop, "SelfCite scoring")
                buf = anchor_kv(self.model, full)
                self.stats.forward_calls += 1
                self.stats.tokens += len(full)
            self._anchor = (full[:buf.used], buf)
        anchor, buf = self._anchor
        scores, st = score_rows(self.model, [(ids, n) for _, ids, n in rows], batch_size=self.batch_size,
                                anchor=anchor, pad_id=self.lm.pad_id, anchor_buffer=buf,
                                before_pass=lambda: check_stop(self.should_stop, "SelfCite scoring"))
        self.stats.forward_calls += st["passes"]
        self.stats.sequences += len(rows)
        self.stats.tokens += st["computed_tokens"]
        self.stats.seconds += time.perf_counter() - t0
        return [sum(x) / len(x) for x in scores]

    def _run_hf(self, rows: list[tuple[int, list[int], int]]) -> list[float]:
        """Transformers' forward over the generation cache (models the tessera engine does not run).

        ``ids[:prefix_len]`` must equal the full prompt's first ``prefix_len`` tokens; the
        cached KV is used for them when available.  Rows are grouped by prefix length and
        run in right-padded batches.
        """
        t0 = time.perf_counter()
        out = [0.0] * len(rows)
        groups: dict[int, list[int]] = defaultdict(list)
        for i, (L, _, _) in enumerate(rows):
            groups[L if self._base is not None else 0].append(i)
        pad = self.lm.tokenizer.pad_token_id or 0
        device = self.lm.device
        for L, members in groups.items():
            for s in range(0, len(members), self.batch_size):
                chunk = members[s:s + self.batch_size]
                B = len(chunk)
                suffixes = [rows[i][1][L:] for i in chunk]
                T = max(len(x) for x in suffixes)
                x = torch.full((B, T), pad, dtype=torch.long, device=device)
                mask = torch.zeros((B, L + T), dtype=torch.long, device=device)
                mask[:, :L] = 1
                for r, suf in enumerate(suffixes):
                    x[r, :len(suf)] = torch.tensor(suf, device=device)
                    mask[r, L:L + len(suf)] = 1
                for r, i in enumerate(chunk):
                    if rows[i][2] >= len(suffixes[r]):
                        raise ValueError("the measured tokens must follow at least one suffix token")
                # logits only where they are needed (the lm head over a 49k vocabulary is not free)
                first = min(len(suffixes[r]) - rows[i][2] - 1 for r, i in enumerate(chunk))
                kv = prefix_cache(self._base, L, B) if L > 0 else None
                check_stop(self.should_stop, "SelfCite scoring")
                with torch.inference_mode():
                    kwargs = {"cache": kv, "use_cache": True} if kv is not None else {}
                    logits = self.model(input_ids=x, attention_mask=mask if B > 1 else None, logits_to_keep=T - first,
                                        **kwargs).logits.float()
                self.stats.forward_calls += 1
                self.stats.sequences += B
                self.stats.tokens += sum(len(sfx) for sfx in suffixes)
                for r, i in enumerate(chunk):
                    n = rows[i][2]
                    m = len(suffixes[r])
                    lp = torch.log_softmax(logits[r, m - n - 1 - first:m - 1 - first], -1)
                    tgt = x[r, m - n:m]
                    out[i] = float(lp.gather(-1, tgt[:, None])[:, 0].mean())
        self.stats.seconds += time.perf_counter() - t0
        return out

    # -- scoring --------------------------------------------------------------------------
    def score(self, j: int, candidates: Sequence[Sequence[Span]]) -> list[CitationScore]:
        """SelfCite reward of each candidate citation for statement ``j`` (memoised)."""
        a, b = self.response.statement_tokens[j]
        n_measure = b - a
        resp = self.response.response_ids[:b]
        full = self.logp_full(j)
        n_ctx = len(self.prompt.context)
        todo: list[tuple[int, ...]] = []
        for spans in candidates:
            key = tuple(span_numbers(spans))
            if (j, key) not in self._memo and key not in todo:
                todo.append(key)
        rows = []
        head = len(self.prompt.head_ids)
        for key in todo:
            first = key[0] if key else n_ctx + 1
            drop_ids = self.prompt.ids(set(range(1, n_ctx + 1)) - set(key)) + resp
            rows.append((self.prompt.shared_prefix(first), drop_ids, n_measure))
            rows.append((head, self.prompt.ids(key) + resp, n_measure))
        vals = self._run(rows) if rows else []
        for t, key in enumerate(todo):
            removed, held = vals[2 * t], vals[2 * t + 1]
            pd, ph = prob_drop(full, removed), prob_hold(held, full)
            cited = self.prompt.cited_tokens(key)
            reward = selfcite_reward(pd, ph, cited, len(key), self.length_limit)
            self._memo[(j, key)] = CitationScore(spans_from_numbers(key), full, removed, held, pd, ph, reward, cited,
                                                 reward < pd + ph)
        return [self._memo[(j, tuple(span_numbers(s)))] for s in candidates]

    def hold_only(self, j: int, numbers: Sequence[int]) -> list[float]:
        """``prob_hold`` of each single sentence for statement ``j`` (one cheap batched pass per batch)."""
        a, b = self.response.statement_tokens[j]
        resp = self.response.response_ids[:b]
        head = len(self.prompt.head_ids)
        full = self.logp_full(j)
        vals = self._run([(head, self.prompt.ids([i]) + resp, b - a) for i in numbers])
        return [prob_hold(v, full) for v in vals]


@dataclass
class CiteResult:
    """A response with its statements' final citations, their rewards and what it cost."""

    question: str
    response: CitedResponse
    statements: list[Statement]
    method: str
    candidates: list[list[dict]] = field(default_factory=list)  # per statement: scored candidates
    stats: dict = field(default_factory=dict)

    @property
    def text(self) -> str:
        return format_response(self.statements)

    def to_dict(self) -> dict:
        return {"question": self.question, "method": self.method, "response": self.text,
                "statements": [s.to_dict() for s in self.statements], "candidates": self.candidates,
                "stats": self.stats}


def _apply(statement: Statement, score: CitationScore, context) -> Statement:
    return Statement(statement.text, list(score.spans), attach(context, score.spans), score.reward,
                     score.prob_drop, score.prob_hold)


def score_statements(lm, prompt: CitePrompt, response: CitedResponse, scorer: SelfCiteScorer | None = None) -> list[Statement]:
    """The response's own citations with their SelfCite rewards (2 scoring rows per statement)."""
    scorer = scorer or SelfCiteScorer(lm, prompt, response)
    out = []
    for j, st in enumerate(response.statements):
        check_stop(scorer.should_stop, "SelfCite scoring")
        out.append(_apply(st, scorer.score(j, [st.spans])[0], prompt.context))
    return out


def best_of_n(lm, prompt: CitePrompt, response: CitedResponse, n: int = BEST_OF_N,
              temperature: float = BON_TEMPERATURE, top_p: float = BON_TOP_P, max_tokens: int = BON_MAX_TOKENS,
              seed: int = 0, scorer: SelfCiteScorer | None = None, max_spans: int = MAX_SPANS,
              should_stop: StopHook = None) -> CiteResult:
    """SelfCite best-of-N (section 2.3, "Best-of-N Sampling"): at each ``<cite>`` sample ``n``
    citations, dedupe, rerank by the reward, splice the best back; the statements never change.

    The response's own citation is always among the candidates, so the chosen citation's
    reward is never below the original's.  Sampling continues the response's KV cache
    in one batch of ``n`` rows per statement, under the citation grammar.  ``should_stop``
    (default: the scorer's) is polled between statements and before every forward pass.
    """
    t0 = time.perf_counter()
    scorer = scorer or SelfCiteScorer(lm, prompt, response, should_stop=should_stop)
    if should_stop is not None:
        scorer.should_stop = should_stop
    should_stop = scorer.should_stop
    gen = torch.Generator(device=lm.device).manual_seed(seed)
    n_ctx = len(prompt.context)
    sampling = ScoreStats()
    parse_stats = ParseStats()
    statements, tables = [], []
    for j, st in enumerate(response.statements):
        check_stop(should_stop, "best-of-N citation sampling")
        prefix = response.prompt_ids + response.response_ids[:response.cite_tokens[j]]
        bodies, s_stats = sample_citations(lm, response.cache, prefix, n_ctx, n, temperature, top_p, max_tokens, gen, max_spans,
                                           should_stop=should_stop)
        sampling.add({"forward_calls": s_stats["forward_calls"], "sequences": s_stats["decode_rows"],
                      "tokens": s_stats["tokens_forwarded"]})
        cands: list[list[Span]] = [list(st.spans)]
        for body in bodies:
            spans = parse_citation(body, n_ctx, max_spans, parse_stats)
            if spans and spans_from_numbers(span_numbers(spans)) not in [spans_from_numbers(span_numbers(c)) for c in cands]:
                cands.append(spans)
        scores = scorer.score(j, cands)
        best = max(range(len(scores)), key=lambda i: (scores[i].reward, -i))
        statements.append(_apply(st, scores[best], prompt.context))
        tables.append([dict(s.to_dict(), sampled=i > 0, chosen=i == best) for i, s in enumerate(scores)])
    stats = {"sampling": sampling.to_dict(), "scoring": scorer.stats.to_dict(), "parse": parse_stats.to_dict(),
             "seconds": time.perf_counter() - t0}
    return CiteResult(prompt.question, response, statements, f"best_of_{n}", tables, stats)


def reward_search(lm, prompt: CitePrompt, response: CitedResponse, top_k: int = 4, max_spans: int = MAX_SPANS,
                  scorer: SelfCiteScorer | None = None, should_stop: StopHook = None) -> CiteResult:
    """Reward-only citation selection: search sentence sets directly with the reward, no sampling.

    Not in the paper; for models too small to propose good citations.  Per statement:
    (1) ``prob_hold`` of every single sentence (short prompts, batched); (2) the full
    reward of the ``top_k`` best of them; (3) forward selection: starting from the best
    single sentence, add the next ones in reward order while the reward improves (at
    most ``max_spans`` ranges).  The response's own citation is a candidate too, so the
    result never scores below it.  Cost per statement: ``n`` short rows, then at most
    ``2 * (2 * top_k)`` ablation rows.  ``should_stop`` (default: the scorer's) is polled
    between statements and before every scoring pass.
    """
    t0 = time.perf_counter()
    scorer = scorer or SelfCiteScorer(lm, prompt, response, should_stop=should_stop)
    if should_stop is not None:
        scorer.should_stop = should_stop
    n_ctx = len(prompt.context)
    statements, tables = [], []
    for j, st in enumerate(response.statements):
        check_stop(scorer.should_stop, "SelfCite scoring")
        holds = scorer.hold_only(j, range(1, n_ctx + 1))
        order = sorted(range(1, n_ctx + 1), key=lambda i: -holds[i - 1])[:max(1, top_k)]
        singles = scorer.score(j, [[(i, i)] for i in order] + [list(st.spans)])
        ranked = sorted(zip(order, singles), key=lambda x: -x[1].reward)
        best = max(singles, key=lambda s: s.reward)
        nums = list(span_numbers(ranked[0][1].spans))
        for i, _ in ranked[1:]:
            trial = spans_from_numbers(nums + [i])
            if len(trial) > max_spans:
                continue
            score = scorer.score(j, [trial])[0]
            if score.reward <= max(best.reward, scorer.score(j, [spans_from_numbers(nums)])[0].reward):
                break
            nums, best = span_numbers(trial), score
        statements.append(_apply(st, best, prompt.context))
        tables.append([dict(s.to_dict(), chosen=s is best) for s in singles])
    stats = {"scoring": scorer.stats.to_dict(), "seconds": time.perf_counter() - t0}
    return CiteResult(prompt.question, response, statements, "reward_search", tables, stats)


def cite(lm, context, question: str, best_of: int = 0, search: bool = False, answer: str | list[str] | None = None,
         max_new_tokens: int = 256, max_statements: int = 4, temperature: float = 0.0, seed: int = 0,
         score: bool = True, bon_temperature: float = BON_TEMPERATURE, bon_top_p: float = BON_TOP_P,
         should_stop: StopHook = None) -> CiteResult:
    """Answer ``question`` from ``context`` with SelfCite citations.

    ``best_of=0``: direct prompting (citations decoded under the grammar, then scored
    when ``score``); ``best_of=N``: SelfCite best-of-N; ``search=True``: the reward-only
    search.  ``answer`` (text or a list of statements) forces the statements and only
    decodes citations for them.  ``should_stop``: optional cancellation hook, polled
    before every forward pass and between statements; raises
    :class:`~tessera.errors.Cancelled` once it returns true (see the module docstring).
    """
    from tessera.errors import InputError

    if best_of < 0:
        raise InputError(f"--best-of must be 0 or more, got {best_of}")
    t0 = time.perf_counter()
    prompt = CitePrompt(lm.tokenizer, context, question)
    forced = None
    if answer is not None:
        forced = split_statements(answer) if isinstance(answer, str) else [s for s in answer if s.strip()]
        if not forced:
            raise InputError("the answer to cite is empty; pass a non-empty answer")
    response = generate_cited(lm, prompt, max_new_tokens=max_new_tokens, max_statements=max(max_statements, len(forced or [])),
                              temperature=temperature, seed=seed, answer_statements=forced, should_stop=should_stop)
    gen_s = time.perf_counter() - t0
    scorer = SelfCiteScorer(lm, prompt, response, should_stop=should_stop)
    if search:
        result = reward_search(lm, prompt, response, scorer=scorer)
    elif best_of > 0:
        result = best_of_n(lm, prompt, response, n=best_of, temperature=bon_temperature, top_p=bon_top_p, seed=seed, scorer=scorer)
    else:
        statements = score_statements(lm, prompt, response, scorer) if score else list(response.statements)
        result = CiteResult(question, response, statements, "direct", [], {"scoring": scorer.stats.to_dict()})
    result.stats["generation"] = dict(response.stats, seconds=gen_s)
    result.stats["seconds"] = time.perf_counter() - t0
    return result


def cite_answer(lm, question: str, passages: Sequence, best_of: int = 0, answer: str | None = None,
                search: bool = False, max_new_tokens: int = 256, max_statements: int = 4, seed: int = 0,
                should_stop: StopHook = None) -> list[Statement]:
    """Statements with citations mapped back to source documents, for ``tessera ask --cite``.

    ``lm``: a :class:`~tessera.lm.LocalLM` (or a model spec to load).
    ``passages``: the numbered sources the answer was generated from, in prompt order
    (objects or dicts with ``text``, ``doc_id``, ``start`` and optionally ``title`` and
    ``number``, e.g. ``tessera.ask.Source``).  They are split into sentences (pysbd)
    numbered ``<C1>..<Cn>``; each :class:`Statement`'s ``cited`` sentences carry
    ``doc_id``, ``title``, ``source`` (the passage number) and ``start``/``end``
    character offsets into the source document.  With ``answer`` (e.g. the answer
    ``ask`` already streamed) its sentences are the statements and only the citations
    are decoded; without it the LM writes a cited answer itself.  ``best_of=N`` reranks
    N sampled citations per statement with the SelfCite reward (slower).  ``should_stop``:
    optional cancellation hook (see :func:`cite`).
    """
    from tessera.attribution.format import CitationContext

    check_stop(should_stop, "citation")
    context = CitationContext.from_passages(passages)
    if isinstance(lm, str):
        from tessera.lm import LocalLM

        lm = LocalLM.load(lm)
    return cite(lm, context, question, best_of=best_of, search=search, answer=answer,
                max_new_tokens=max_new_tokens, max_statements=max_statements, seed=seed,
                should_stop=should_stop).statements
