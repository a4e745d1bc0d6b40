"""NEST: nearest-neighbour speculative decoding with span copying and attribution.

NEST (Li et al., "Nearest Neighbor Speculative Decoding for LLM Generation and
Attribution", NeurIPS 2024, arXiv 2405.19325; public code facebookresearch/NEST)
decodes with a semi-parametric LM:

1. **Two-stage retrieval** (paper section 3.1).  Passages first (a
   :class:`~tessera.retrieval.corpus_index.CorpusIndex`: BM25, dense or hybrid),
   then token-level keys for those passages only: the LM's hidden state at the
   *output of the second-to-last decoder layer* for every passage token
   (``hidden_states[-2]`` in Hugging Face's indexing, where ``hidden_states[-1]``
   is the final-norm output; the code's ``TokenIndex.build_index`` and
   ``KNNTransformer.forward`` in ``models/knn_transformers.py``), value = the next
   token, with its document id and character span (fast tokenizer offsets mapped
   through the passage's ``start``).  Keys are computed once per passage and cached
   under ``$TESSERA_HOME/nest/keys/<model key>/``
   (:func:`~tessera.attribution.nest_store.build_datastore`).
2. **Mixture** (section 3.1, eq. 1-3): :func:`knn_distribution`,
   :func:`relative_retrieval_confidence`, :func:`retrieval_lambda`, :func:`mixture`.
3. **Dynamic span selection** (section 3.2): when lambda < delta the neighbour whose
   token has the highest mixture probability is taken and the next ``window``
   corpus tokens from it are proposed.
4. **Relaxed speculative decoding** (section 3.3, eq. 4): the proposal is scored in
   one LM forward pass with the KV cache, the mixture recomputed at every position,
   the longest prefix with ``p_M(x) >= gamma * max_w p_M(w)`` accepted
   (:func:`relaxed_accept_length`), the first rejected token replaced by the
   mixture's choice and the cache cropped back.  Corpus positions that were copied
   are masked; a span accepted to its end keeps reading the corpus (the next
   ``window`` tokens after it) without a new neighbour selection.
5. **Attribution**: every output token carries its source (document id and
   character span) or ``None`` (the model);
   :class:`~tessera.attribution.nest_store.NestResult` renders copied spans with
   ``[doc_id]`` citations and reports the attribution ratio.

This module is the method, in that order: :class:`NestConfig`, the mixture
(eq. 1-3), span selection, relaxed acceptance (eq. 4), :func:`nest_decode` (its
stages are :class:`_NestDecoder`'s methods) and the entry points
:func:`nest_generate` / :func:`nest_answer`.  The token keys, their cache, the
datastore and the result types are in :mod:`tessera.attribution.nest_store`; the
baselines (greedy, kNN-LM, in-context RAG, prompt lookup) in
:mod:`tessera.attribution.nest_baselines`.

Differences from the public code, on purpose:

- the acceptance test is the paper's ``p_M(x) >= gamma * max p_M``; the code
  compares with ``0.5 * gamma * max`` (``generation.py``), so the code's
  ``gamma=5e-4`` is ``gamma=2.5e-4`` here;
- the code picks the proposal by the *LM share* ``lambda * p_LM(v)`` of each
  neighbour's token (it gathers from the first half of its concatenated
  ``[lambda p_LM, (1-lambda) p_kNN]``) plus ``1e-6`` times the neighbour's own
  weight; here it is the paper's "highest mixture probability" ``p_M(v)``, ties
  going to the nearer neighbour;
- a token chosen one at a time by the mixture counts as the model's, even when it
  equals the top neighbour's token (the code credits it to that neighbour): the
  attribution ratio counts only tokens accepted from corpus spans;
- keys at the first position of a passage sequence are dropped: Llama-family
  models put an attention-sink activation there (SmolLM2-135M: hidden-state norm
  about 9200 against about 600 elsewhere), which would be every query's farthest
  neighbour and so drive the relative retrieval confidence to 0 on small datastores;
- a passage is keyed with its document title as context (``title + "\\n"``, as the
  code's ``encode`` prefixes ``f"{title} {text}"``); only the passage's own tokens
  are values;
- masking is by document character span, so a sentence that two overlapping
  passages share is not copied twice either.

Speed on this 2-core CPU (SmolLM2-135M, fp32): one cached token about 84 ms, a
64-token span about 330 ms, so a span accepted whole costs about 4 single-token
steps; see ``benchmarks/nest.py``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields

import torch

from tessera.attribution.nest_store import (
    Emitter,
    KeyCacheInfo,
    NestResult,
    NestStats,
    TokenDatastore,
    TokenSource,
    build_datastore,
    check_prompt,
    lm_forward,
    make_result,
)
from tessera.data.chunking import Passage
from tessera.errors import InputError

PASSAGE_K_CPU = 8
"""Default passages per query: the paper retrieves 40 (the code's constructor 10); 8 on CPU."""


# --------------------------------------------------------------------------- config


@dataclass
class NestConfig:
    """NEST's hyper-parameters.  Defaults are the eval script's (``eval.py``) unless said.

    - ``passage_k``: passages retrieved for the datastore; 8 here for CPU (paper 40,
      code constructor 10).
    - ``token_k``: neighbours per query token, exact L2 (paper and code 1024); fewer
      when the datastore holds fewer unmasked tokens.
    - ``alpha``, ``tau``: offset and scale of the relative retrieval confidence
      (eval script 0.3 and 0.1; constructor default alpha 0.1).
    - ``delta``: lambda below which a span is proposed (code ``beta``, 0.5).
    - ``gamma``: relaxed-acceptance leniency, accept ``x`` iff
      ``p_M(x) >= gamma * max_w p_M(w)``.  The sources use 5e-2
      (``generation.py`` default) and 5e-4 (eval scripts), both applied as
      ``0.5 * gamma`` in the code.  Default 5e-4; ``gamma > 1`` accepts nothing.
    - ``window``: longest proposal in tokens (eval script 64).
    - ``lm_temperature``: ``p_LM = softmax(logits / T)`` inside the mixture (code
      constructor ``temp=0.7``, never overridden by the eval script; the paper is silent).
    - ``retriever``, ``encoder``: first-stage retrieval (``bm25`` | ``dense`` |
      ``hybrid``, as :meth:`CorpusIndex.search`); the paper fuses BM25 and dense.
    - ``cache_keys``: read and write token keys under ``$TESSERA_HOME/nest/keys``.
    """

    passage_k: int = PASSAGE_K_CPU
    token_k: int = 1024
    alpha: float = 0.3
    tau: float = 0.1
    delta: float = 0.5
    gamma: float = 5e-4
    window: int = 64
    lm_temperature: float = 0.7
    retriever: str = "bm25"
    encoder: str = "default-encoder"
    cache_keys: bool = True

    def __post_init__(self):
        if self.passage_k < 0:
            raise InputError(f"passage_k must be 0 or more, got {self.passage_k}")
        if self.token_k < 1:
            raise InputError(f"token_k must be at least 1, got {self.token_k}")
        if self.window < 1:
            raise InputError(f"window must be at least 1, got {self.window}")
        if self.tau <= 0:
            raise InputError(f"tau must be positive, got {self.tau}")
        if self.gamma < 0:
            raise InputError(f"gamma must be 0 or more, got {self.gamma}")
        if self.lm_temperature <= 0:
            raise InputError(f"lm_temperature must be positive, got {self.lm_temperature}")


# --------------------------------------------------------------------------- interpolation (section 3.1, eq. 1-3)


def knn_distribution(distances: torch.Tensor, values: torch.Tensor, vocab_size: int, dim: int) -> torch.Tensor:
    """p_kNN over the vocabulary from the top-k neighbours (NEST section 3.1, eq. 1).

    ``p_kNN(w) = sum_{i: v_i = w} softmax_i(-d_i / sqrt(dim))`` where ``d_i`` is the
    *squared* L2 distance between the query and key ``i`` (the code computes
    ``|q|^2 + |k|^2 - 2 q.k``), ``dim`` the hidden size and ``v_i`` the neighbour's
    value token; the weights are scattered onto the vocabulary with ``scatter_add``
    (``models/knn_transformers.py``, ``KNNTransformer.forward``).  Neighbours at
    infinite distance (masked) get weight 0.

    ``distances``, ``values``: ``[..., k]`` -> ``[..., vocab_size]``.
    """
    weights = torch.softmax(-distances.float() / math.sqrt(dim), dim=-1)
    out = torch.zeros(*distances.shape[:-1], vocab_size, dtype=weights.dtype, device=weights.device)
    return out.scatter_add_(-1, values.long(), weights)


def relative_retrieval_confidence(distances: torch.Tensor) -> torch.Tensor:
    """RRC = ``min_i d_i / max_i d_i`` over the top-k squared L2 distances (NEST section 3.1, eq. 2).

    NEST's code (``KNNTransformer.compute_inter_coef``) computes
    ``max(s) / min(s)`` of the scores ``s_i = -d_i``, which is the same ratio:
    near 0 when the nearest neighbour is much closer than the k-th (confident
    retrieval), near 1 when all neighbours are equally far.  ``distances``:
    ``[..., k]`` -> ``[...]``; a zero largest distance gives 0.
    """
    d = distances.float()
    return d.min(dim=-1).values / d.max(dim=-1).values.clamp_min(1e-12)


def retrieval_lambda(rrc: torch.Tensor, alpha: float = 0.3, tau: float = 0.1) -> torch.Tensor:
    """``lambda = sigmoid((RRC - alpha) / tau)`` (NEST section 3.1, eq. 2; code ``compute_inter_coef``).

    lambda is the LM's weight in the mixture: confident retrieval (small RRC) gives a
    small lambda, i.e. trust the corpus.
    """
    return torch.sigmoid((rrc - alpha) / tau)


def mixture(p_lm: torch.Tensor, p_knn: torch.Tensor, lam: torch.Tensor | float) -> torch.Tensor:
    """``p_M = lambda * p_LM + (1 - lambda) * p_kNN`` (NEST section 3.1, eq. 3; code ``forward``, evaluation mode).

    ``p_lm``, ``p_knn``: ``[..., V]``; ``lam``: a float or ``[...]`` (broadcast over V).
    """
    if isinstance(lam, torch.Tensor):
        lam = lam.to(p_lm.dtype).unsqueeze(-1)
    return lam * p_lm + (1 - lam) * p_knn


@dataclass
class Mix:
    """Mixture at ``n`` positions: ``p_m [n, V]``, ``lam [n]``, neighbours ``idx``/``dist`` ``[n, k]`` (or None)."""

    p_m: torch.Tensor
    lam: torch.Tensor
    idx: torch.Tensor | None
    dist: torch.Tensor | None


def mixture_at(logits: torch.Tensor, h: torch.Tensor, ds: TokenDatastore | None, cfg: NestConfig,
               fixed_lambda: float | None = None, lm_temperature: float | None = None) -> Mix:
    """The mixture for ``n`` positions from their logits ``[n, V]`` and key-layer states ``[n, d]`` (eq. 1-3).

    ``fixed_lambda`` replaces the adaptive lambda (kNN-LM's constant weight) and
    ``lm_temperature`` the config's; both are for the baselines.
    """
    temp = cfg.lm_temperature if lm_temperature is None else lm_temperature
    p_lm = torch.softmax(logits.float() / temp, dim=-1)
    if ds is None or ds.available == 0:
        return Mix(p_lm, torch.ones(p_lm.shape[0]), None, None)
    dist, idx = ds.search(h, cfg.token_k)
    p_knn = knn_distribution(dist, ds.values[idx], p_lm.shape[-1], dim=h.shape[-1])
    if fixed_lambda is None:
        lam = retrieval_lambda(relative_retrieval_confidence(dist), cfg.alpha, cfg.tau)
    else:
        lam = torch.full((p_lm.shape[0],), float(fixed_lambda))
    return Mix(mixture(p_lm, p_knn, lam), lam, idx, dist)


# --------------------------------------------------------------------------- span selection (section 3.2)


def select_neighbour(p_m: torch.Tensor, idx: torch.Tensor, values: torch.Tensor, used: torch.Tensor | None = None) -> int:
    """The neighbour whose value token has the highest mixture probability; ties go to the nearest (NEST section 3.2).

    ``p_m [V]``; ``idx [k]`` datastore entries sorted nearest first; ``used``: the
    datastore's mask (entries masked since the search are skipped) -> an entry
    index, or -1 when every neighbour is masked.
    """
    scores = p_m[values[idx]].clone()
    if used is not None:
        scores[used[idx]] = -1.0
    best = int(torch.argmax(scores))  # argmax returns the first (nearest) maximum
    return int(idx[best]) if scores[best] >= 0 else -1


# --------------------------------------------------------------------------- relaxed acceptance (section 3.3, eq. 4)


def relaxed_accept_length(p_m: torch.Tensor, tokens: torch.Tensor, gamma: float) -> int:
    """Length of the longest prefix of ``tokens`` that relaxed speculative decoding accepts.

    Token ``x_i`` passes iff ``p_M^(i)(x_i) >= gamma * max_w p_M^(i)(w)`` (NEST
    section 3.3, eq. 4), where ``p_M^(i)`` (row ``i`` of ``p_m``, ``[n, V]``) is the
    mixture at the position that predicts ``x_i``.  The code (``generation.py``)
    takes the cumulative product of the per-token tests with threshold
    ``0.5 * gamma * max``.
    """
    p = p_m.gather(-1, tokens.long().view(-1, 1)).squeeze(-1)
    ok = p >= gamma * p_m.max(dim=-1).values
    bad = (~ok).nonzero()
    return int(bad[0, 0]) if len(bad) else int(tokens.numel())


# --------------------------------------------------------------------------- NEST decoding


class _NestDecoder:
    """The state of one NEST generation and its stages.

    Invariant: the KV cache holds the prompt and every emitted token, and ``cur`` is
    the mixture at the last of them.  ``stream`` is the datastore entry to keep
    reading from after a span accepted to its end (-1: none).  Each :meth:`step`
    proposes a span (:meth:`propose`, section 3.2), verifies it (:meth:`verify`,
    section 3.3) and, unless the whole span was taken or decoding ended, emits the
    mixture's argmax (:meth:`emit_argmax`).
    """

    def __init__(self, lm, datastore: TokenDatastore | None, ids: torch.Tensor, cfg: NestConfig, max_new_tokens: int,
                 on_token: Callable[[str], None] | None):
        self.lm, self.model, self.stop = lm, lm.model, lm.stop_ids
        self.datastore, self.ids, self.cfg, self.max_new_tokens = datastore, ids, cfg, max_new_tokens
        self.stats = NestStats(prompt_tokens=int(ids.shape[1]),
                               datastore_tokens=len(datastore) if datastore is not None else 0)
        self.out_ids: list[int] = []
        self.out_src: list[TokenSource | None] = []
        self.emit = Emitter(lm.tokenizer, on_token)
        self.cache = None
        self.cur: Mix | None = None
        self.stream = -1
        self.done = False  # a stop token ended the generation

    def prefill(self, cache, t0: float) -> None:
        """Run the prompt into ``cache`` (a fresh KV cache; ``prefill_s`` counts this pass from ``t0``) and mix
        at its last position."""
        self.cache = cache
        logits, h = lm_forward(self.model, self.ids, self.cache, last_only=True)
        self.stats.prefill_s = time.perf_counter() - t0
        self.cur = mixture_at(logits, h, self.datastore, self.cfg)

    @property
    def remaining(self) -> int:
        return self.max_new_tokens - len(self.out_ids)

    def push(self, tokens: list[int], sources: list[TokenSource | None]) -> None:
        self.out_ids.extend(tokens)
        self.out_src.extend(sources)
        self.emit.add(tokens)

    def propose(self) -> list[int]:
        """Dynamic span selection (section 3.2): datastore entries to copy next, or ``[]``.

        After a span accepted to its end, the corpus tokens that follow it (no new
        neighbour selection); otherwise, when lambda < delta, the next ``window``
        corpus tokens from the neighbour whose token has the highest mixture
        probability (:func:`select_neighbour`).
        """
        ds, cur, cfg = self.datastore, self.cur, self.cfg
        proposal: list[int] = []
        if ds is not None and cur.idx is not None:
            if self.stream >= 0:
                proposal = ds.read(self.stream, min(cfg.window, self.remaining))
            if not proposal and float(cur.lam[-1]) < cfg.delta:
                j = select_neighbour(cur.p_m[-1], cur.idx[-1], ds.values, ds.used)
                proposal = ds.read(j, min(cfg.window, self.remaining)) if j >= 0 else []
        self.stream = -1
        return proposal

    def verify(self, proposal: list[int]) -> torch.Tensor | None:
        """Relaxed speculative decoding of a proposal (section 3.3, eq. 4).

        The first token is tested against ``cur``; if it passes, the span is scored in
        one forward pass, the mixture recomputed at every position and the longest
        prefix that passes :func:`relaxed_accept_length` copied (stopping before a
        corpus stop token, which ends the generation).  Returns the mixture that
        picks the next token (at the first rejected position, after cropping the
        cache back), or ``None`` when this step is over: the span was accepted to its
        end (``cur`` and ``stream`` move on) or a stop token was reached.
        """
        ds, cfg, stats = self.datastore, self.cfg, self.stats
        p_cur = self.cur.p_m[-1]
        stats.proposals += 1
        toks = ds.values[proposal]
        if relaxed_accept_length(p_cur.unsqueeze(0), toks[:1], cfg.gamma) != 1:
            stats.accepted_span_lengths.append(0)
            return p_cur
        logits, h = lm_forward(self.model, toks.view(1, -1).to(self.ids.device), self.cache)
        stats.forward_passes += 1
        span_mix = mixture_at(logits, h, ds, cfg)
        n = len(proposal)
        m = 1 + relaxed_accept_length(span_mix.p_m[: n - 1], toks[1:], cfg.gamma) if n > 1 else 1
        accepted, acc_toks = proposal[:m], toks[:m].tolist()
        hit_stop = next((i for i, t in enumerate(acc_toks) if t in self.stop), None)
        if hit_stop is not None:  # a corpus token that is a stop token ends the generation there
            accepted, acc_toks = accepted[:hit_stop], acc_toks[:hit_stop]
        stats.accepted_span_lengths.append(len(accepted))
        self.push(acc_toks, [ds.source(i) for i in accepted])
        ds.mark_used(accepted)
        if hit_stop is not None:
            stats.stop_reason = "eos"
            self.done = True
            return None
        if m == n:
            self.cur = Mix(span_mix.p_m[-1:], span_mix.lam[-1:], span_mix.idx[-1:], span_mix.dist[-1:]) \
                if span_mix.idx is not None else Mix(span_mix.p_m[-1:], span_mix.lam[-1:], None, None)
            self.stream = ds.next[proposal[-1]]
            return None
        self.cache.crop(-(n - m))  # drop the rejected tail (a negative count: transformers 5 semantics)
        return span_mix.p_m[m - 1]

    def emit_argmax(self, p_cur: torch.Tensor) -> None:
        """Emit the mixture's choice (the model's token) and, if decoding goes on, mix at it."""
        token = int(torch.argmax(p_cur))
        if token in self.stop:
            self.stats.stop_reason = "eos"
            self.done = True
            return
        self.push([token], [None])
        if self.remaining <= 0:
            return
        logits, h = lm_forward(self.model, torch.tensor([[token]], device=self.ids.device), self.cache)
        self.stats.forward_passes += 1
        self.cur = mixture_at(logits, h, self.datastore, self.cfg)

    def step(self) -> None:
        """One decoding step: propose and verify a span, then emit the mixture's argmax unless the step is over."""
        proposal = self.propose()
        p_cur = self.cur.p_m[-1]
        if proposal:
            p_cur = self.verify(proposal)
            if p_cur is None or self.remaining <= 0:
                return
        self.emit_argmax(p_cur)


@torch.inference_mode()
def nest_decode(lm, datastore: TokenDatastore | None, input_ids: torch.Tensor, config: NestConfig | None = None,
                max_new_tokens: int = 128, on_token: Callable[[str], None] | None = None) -> NestResult:
    """NEST decoding (greedy) of ``input_ids`` ``[1, T]`` over ``datastore``.

    Invariant: the KV cache holds the prompt and every emitted token, and ``cur``
    is the mixture at the last of them.  Each step either

    - proposes a span (lambda < delta: the best neighbour's next ``window`` corpus
      tokens; or, after a span accepted to its end, the corpus tokens that follow
      it), checks its first token against ``cur`` and, if it passes, scores the
      span in one forward pass, accepts the longest prefix that passes the relaxed
      test, replaces the first rejected token by the mixture's argmax and crops the
      cache back; or
    - emits the mixture's argmax (one forward pass for the next step).

    Copied tokens carry their source; their corpus positions are masked.  The
    datastore's masks are reset first, so one datastore serves many generations.
    The stages are :class:`_NestDecoder`'s methods.
    """
    from transformers import DynamicCache

    cfg = config or NestConfig()
    ids = check_prompt(lm, input_ids, max_new_tokens)
    if datastore is not None:
        datastore.reset()
    dec = _NestDecoder(lm, datastore, ids, cfg, max_new_tokens, on_token)
    stats = dec.stats
    t0 = time.perf_counter()
    dec.prefill(DynamicCache(config=lm.model.config), t0)
    stats.stop_reason = "length"
    while not dec.done and dec.remaining > 0:
        dec.step()
    stats.generate_s = time.perf_counter() - t0
    return make_result(lm, dec.out_ids, dec.out_src, stats, datastore.passages if datastore is not None else (),
                       method="nest")


# --------------------------------------------------------------------------- entry points


def _load_lm(lm):
    from tessera.lm.local import LocalLM

    if isinstance(lm, LocalLM) or hasattr(lm, "stop_ids"):
        return lm
    return LocalLM.load(lm)


def retrieve(index, query: str, config: NestConfig) -> tuple[list[Passage], float]:
    """First stage: the top ``passage_k`` passages for ``query`` -> (passages, seconds)."""
    t = time.perf_counter()
    if config.passage_k == 0:
        return [], 0.0
    if config.retriever != "bm25":
        index.dense(config.encoder)  # load or build once, so that the time below is search time
        index.encoder(config.encoder)
        t = time.perf_counter()
    hits = index.search(query, config.passage_k, retriever=config.retriever, encoder=config.encoder)
    return [h.passage for h in hits], time.perf_counter() - t


def encode_prompt(lm, prompt: str, chat: bool = False) -> torch.Tensor:
    """Raw text continuation (no special tokens added) or, with ``chat``, one user turn in the chat template."""
    if not prompt or not prompt.strip():
        raise InputError("the prompt is empty; pass some text to continue")
    if chat:
        return lm.encode_chat([{"role": "user", "content": prompt}])
    ids = lm.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    return torch.tensor([ids], dtype=torch.long, device=lm.device)


def nest_generate(prompt: str, corpus="python-docs", lm="default", config: NestConfig | None = None,
                  max_new_tokens: int = 128, chat: bool = False, query: str | None = None,
                  on_token: Callable[[str], None] | None = None) -> NestResult:
    """Retrieve passages for ``query`` (default: the prompt), key them, decode with NEST.

    ``corpus``: a :class:`CorpusIndex` or a spec for :meth:`CorpusIndex.open`
    (``python-docs`` or a path); ``lm``: a :class:`LocalLM` or a model spec.
    """
    from tessera.retrieval.corpus_index import CorpusIndex

    cfg = config or NestConfig()
    model = _load_lm(lm)
    ids = encode_prompt(model, prompt, chat=chat)
    check_prompt(model, ids, max_new_tokens)  # fail before any retrieval or key building
    index = corpus if isinstance(corpus, CorpusIndex) else CorpusIndex.open(corpus)
    passages, retrieval_s = retrieve(index, query or prompt, cfg)
    ds, info = build_datastore(model, passages, cache=cfg.cache_keys)
    result = nest_decode(model, ds, ids, cfg, max_new_tokens=max_new_tokens, on_token=on_token)
    _fill_retrieval_stats(result, retrieval_s, info)
    return result


def _fill_retrieval_stats(result: NestResult, retrieval_s: float, info: KeyCacheInfo) -> None:
    result.stats.retrieval_s = retrieval_s
    result.stats.keys_s = info.seconds
    result.stats.keys_built = info.built
    result.stats.keys_cached = info.cached


def nest_answer(lm, corpus_index, question: str, prompt, *, passages: Sequence | None = None,
                config: NestConfig | None = None, max_new_tokens: int = 256,
                on_token: Callable[[str], None] | None = None) -> NestResult:
    """NEST decoding for ``tessera ask --decode nest``.

    - ``lm``: a :class:`~tessera.lm.LocalLM` (or a model spec);
    - ``corpus_index``: the :class:`CorpusIndex` to retrieve from when ``passages``
      is not given (may be ``None`` when it is);
    - ``question``: the retrieval query;
    - ``prompt``: the ask prompt, as chat messages (``list[dict]``, encoded with the
      chat template) or input ids ``[1, T]``;
    - ``passages``: the datastore's passages, e.g. the ``Source`` objects that ask
      put in the prompt (anything with ``doc_id``, ``title``, ``text``, ``start``,
      ``end`` and ``passage_id``/``id``); default: ``corpus_index.search(question,
      config.passage_k, config.retriever)``.

    Returns a :class:`NestResult` (``.text``, ``.render()`` with ``[doc_id]``
    citations, ``.spans``, ``.stats``).
    """
    cfg = config or NestConfig()
    model = _load_lm(lm)
    if not question or not question.strip():
        raise InputError("the question is empty; pass a question")
    ids = model.encode_chat(prompt) if isinstance(prompt, list) else prompt
    ids = check_prompt(model, ids, max_new_tokens)
    retrieval_s = 0.0
    if passages is None:
        if corpus_index is None:
            raise InputError("nest_answer needs passages or a corpus index to retrieve them from")
        passages, retrieval_s = retrieve(corpus_index, question, cfg)
    ds, info = build_datastore(model, passages, cache=cfg.cache_keys)
    result = nest_decode(model, ds, ids, cfg, max_new_tokens=max_new_tokens, on_token=on_token)
    _fill_retrieval_stats(result, retrieval_s, info)
    return result


def config_from_options(**options) -> NestConfig:
    """A :class:`NestConfig` from keyword options, ignoring ``None`` (CLI helpers)."""
    names = {f.name for f in fields(NestConfig)}
    return NestConfig(**{k: v for k, v in options.items() if k in names and v is not None})
