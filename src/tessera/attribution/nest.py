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
   under ``$TESSERA_HOME/nest/keys/<model key>/`` (:func:`build_datastore`).
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
   character span) or ``None`` (the model); :class:`NestResult` renders copied
   spans with ``[doc_id]`` citations and reports the attribution ratio.

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

import hashlib
import json
import math
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from tessera.data.chunking import Passage
from tessera.errors import InputError
from tessera.hub import tessera_home

KEY_LAYER = -2
"""``hidden_states[-2]``: the output of the second-to-last decoder layer (NEST's code)."""

KEY_FORMAT = 1  # bump when the key file layout or the way keys are computed changes
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


# --------------------------------------------------------------------------- the equations


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


# --------------------------------------------------------------------------- token keys


def model_identity(lm) -> str:
    """A short key naming a model for the key cache: its config, a sample of every weight, its vocabulary.

    Computed once per :class:`~tessera.lm.LocalLM` object (about 0.1 s for SmolLM2).
    """
    key = getattr(lm, "_nest_identity", None)
    if key is not None:
        return key
    h = hashlib.sha256(f"nest-keys-v{KEY_FORMAT}|layer{KEY_LAYER}".encode())
    cfg = lm.model.config.to_dict()
    for drop in ("_name_or_path", "transformers_version", "name_or_path"):
        cfg.pop(drop, None)
    h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    with torch.no_grad():
        for name, p in lm.model.named_parameters():
            flat = p.detach().reshape(-1)
            step = max(1, flat.numel() // 512)
            h.update(name.encode())
            h.update(flat[::step][:512].float().cpu().numpy().tobytes())
    vocab = lm.tokenizer.get_vocab()
    h.update(json.dumps(sorted(vocab.items(), key=lambda kv: kv[1])).encode())
    key = h.hexdigest()[:16]
    try:
        lm._nest_identity = key
    except AttributeError:  # pragma: no cover - slotted objects
        pass
    return key


def _context_prefix(passage: Passage) -> str:
    return f"{passage.title}\n" if passage.title else ""


def passage_key_hash(passage: Passage) -> str:
    """Hash of exactly what the keys depend on: the title context and the passage text."""
    h = hashlib.sha256(_context_prefix(passage).encode("utf-8", "surrogatepass"))
    h.update(b"\x00")
    h.update(passage.text.encode("utf-8", "surrogatepass"))
    return h.hexdigest()


def key_cache_dir(lm) -> Path:
    return tessera_home() / "nest" / "keys" / model_identity(lm)


def key_cache_path(lm, passage: Passage) -> Path:
    h = passage_key_hash(passage)
    return key_cache_dir(lm) / h[:2] / f"{h}.safetensors"


def _forward(model, ids: torch.Tensor, cache=None, last_only: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward pass -> (logits ``[n, V]`` fp32, key-layer hidden states ``[n, d]`` fp32) for batch row 0."""
    out = model(input_ids=ids, cache=cache, use_cache=cache is not None, output_hidden_states=KEY_LAYER,
                logits_to_keep=1 if last_only else 0)
    h = out.hidden_states[KEY_LAYER]
    if last_only:
        h = h[:, -1:]
    return out.logits[0].float(), h[0].float()


@torch.inference_mode()
def passage_keys(lm, passage: Passage) -> dict[str, torch.Tensor]:
    """Keys, values and passage-relative character spans of one passage's tokens.

    The sequence is ``title + "\\n" + text`` (title omitted when empty).  Key ``i``
    is the hidden state at token ``i`` (:data:`KEY_LAYER`), value the token
    ``i + 1``; an entry is kept when its value token lies inside the passage text
    and ``i >= 1`` (see the module docstring on the first position).  Returns
    ``keys [n, d]`` fp32, ``values [n]``, ``starts [n]``, ``ends [n]`` (character
    offsets of the value token in ``passage.text``).
    """
    prefix = _context_prefix(passage)
    enc = lm.tokenizer(prefix + passage.text, return_offsets_mapping=True, add_special_tokens=False)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    max_len = lm.context_window
    ids, offsets = ids[:max_len], offsets[:max_len]
    d = lm.model.config.hidden_size
    empty = {"keys": torch.zeros(0, d), "values": torch.zeros(0, dtype=torch.long),
             "starts": torch.zeros(0, dtype=torch.long), "ends": torch.zeros(0, dtype=torch.long)}
    if len(ids) < 3:
        return empty
    x = torch.tensor([ids], dtype=torch.long, device=lm.device)
    out = lm.model(input_ids=x, output_hidden_states=KEY_LAYER, logits_to_keep=1)
    h = out.hidden_states[KEY_LAYER][0].float().cpu()
    p = len(prefix)
    keep = [i for i in range(1, len(ids) - 1) if offsets[i + 1][0] >= p and offsets[i + 1][1] > offsets[i + 1][0]]
    if not keep:
        return empty
    idx = torch.tensor(keep, dtype=torch.long)
    nxt = idx + 1
    return {
        "keys": h[idx].contiguous(),
        "values": torch.tensor(ids, dtype=torch.long)[nxt],
        "starts": torch.tensor([offsets[i][0] - p for i in nxt.tolist()], dtype=torch.long),
        "ends": torch.tensor([offsets[i][1] - p for i in nxt.tolist()], dtype=torch.long),
    }


def _save_atomic(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _load_keys(path: Path, passage: Passage) -> dict[str, torch.Tensor] | None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("passage_sha256") != passage_key_hash(passage):
                return None
            return {k: f.get_tensor(k) for k in ("keys", "values", "starts", "ends")}
    except Exception:  # missing, truncated or foreign file: recompute
        return None


@dataclass
class KeyCacheInfo:
    """How the datastore's keys were obtained: from the disk cache or computed (seconds)."""

    passages: int = 0
    built: int = 0
    cached: int = 0
    tokens: int = 0
    seconds: float = 0.0


class TokenDatastore:
    """NEST's token-level datastore over a few passages (the second retrieval stage).

    Entry ``i``: ``keys[i]`` (hidden state), ``values[i]`` (the next token),
    ``passage_index[i]``, and the value token's character span ``starts[i]:ends[i]``
    in its document's text.  ``used`` marks entries that were copied (or that
    overlap copied text in the same document); :meth:`search` skips them.
    """

    def __init__(self, passages: Sequence[Passage], parts: Sequence[dict[str, torch.Tensor]], hidden_size: int,
                 device: torch.device | str = "cpu"):
        self.passages = list(passages)
        self.hidden_size = hidden_size
        dev = torch.device(device)
        n_each = [int(p["values"].numel()) for p in parts]
        if parts and sum(n_each):
            self.keys = torch.cat([p["keys"].float() for p in parts]).to(dev)
            self.values = torch.cat([p["values"].long() for p in parts]).to(dev)
            shift = [torch.full_like(p["starts"], ps.start) for p, ps in zip(parts, self.passages)]
            self.starts = torch.cat([p["starts"].long() + s for p, s in zip(parts, shift)]).to(dev)
            self.ends = torch.cat([p["ends"].long() + s for p, s in zip(parts, shift)]).to(dev)
        else:
            self.keys = torch.zeros(0, hidden_size, device=dev)
            self.values = self.starts = self.ends = torch.zeros(0, dtype=torch.long, device=dev)
        self.passage_index = torch.repeat_interleave(torch.arange(len(parts)), torch.tensor(n_each, dtype=torch.long)).to(dev) \
            if parts else torch.zeros(0, dtype=torch.long, device=dev)
        doc_codes = {d: i for i, d in enumerate(dict.fromkeys(p.doc_id for p in self.passages))}
        self.doc_index = torch.tensor([doc_codes[p.doc_id] for p in self.passages], dtype=torch.long, device=dev)[self.passage_index] \
            if len(self.passage_index) else torch.zeros(0, dtype=torch.long, device=dev)
        self.key_sq = (self.keys**2).sum(-1)
        self.used = torch.zeros(len(self.values), dtype=torch.bool, device=dev)
        self.next = self._continuations()

    def __len__(self) -> int:
        return int(self.values.numel())

    @property
    def available(self) -> int:
        return int((~self.used).sum())

    def reset(self) -> None:
        """Unmask every entry (a new generation over the same passages)."""
        self.used.zero_()

    def _continuations(self) -> list[int]:
        """``next[i]``: the entry whose value token follows entry ``i``'s in its document, or -1.

        The following entry of the same passage; past a passage's end, an entry of
        another passage of the same document that starts where entry ``i`` ends.
        """
        n = len(self)
        nxt = [-1] * n
        pidx = self.passage_index.tolist()
        starts, ends, docs = self.starts.tolist(), self.ends.tolist(), self.doc_index.tolist()
        by_start: dict[tuple[int, int], int] = {}
        for j in range(n):
            by_start.setdefault((docs[j], starts[j]), j)
        for i in range(n):
            if i + 1 < n and pidx[i + 1] == pidx[i]:
                nxt[i] = i + 1
            else:
                j = by_start.get((docs[i], ends[i]), -1)
                if j >= 0 and pidx[j] != pidx[i]:
                    nxt[i] = j
        return nxt

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact squared-L2 top-k over unmasked entries: ``queries [n, d]`` -> ``(distances, indices)`` ``[n, k']``.

        ``k' = min(k, unmasked entries)``; distances ascending.
        """
        q = queries.float().to(self.keys.device)
        dist = self.key_sq.unsqueeze(0) + (q**2).sum(-1, keepdim=True) - 2 * q @ self.keys.T
        dist = dist.clamp_min_(0).masked_fill_(self.used.unsqueeze(0), float("inf"))
        k = min(k, self.available)
        d, idx = torch.topk(dist, k=k, dim=-1, largest=False, sorted=True)
        return d, idx

    def read(self, start: int, n: int) -> list[int]:
        """Up to ``n`` consecutive unmasked entries of the corpus from ``start`` on."""
        out: list[int] = []
        i = start
        while i >= 0 and len(out) < n and not bool(self.used[i]):
            out.append(i)
            i = self.next[i]
        return out

    def mark_used(self, entries: Sequence[int]) -> None:
        """Mask the copied entries and every entry overlapping their text in the same document."""
        if not entries or not len(self):
            return
        e = torch.tensor(list(entries), dtype=torch.long, device=self.values.device)
        hit = (self.doc_index.unsqueeze(0) == self.doc_index[e].unsqueeze(1)) \
            & (self.starts.unsqueeze(0) < self.ends[e].unsqueeze(1)) & (self.ends.unsqueeze(0) > self.starts[e].unsqueeze(1))
        self.used |= hit.any(dim=0)
        self.used[e] = True

    def source(self, i: int) -> "TokenSource":
        p = self.passages[int(self.passage_index[i])]
        return TokenSource(doc_id=p.doc_id, passage_id=p.id, start=int(self.starts[i]), end=int(self.ends[i]))


def as_passage(obj) -> Passage:
    """A :class:`Passage`, or anything with ``doc_id``, ``text``, ``start``, ``end`` and
    ``id``/``passage_id`` (e.g. ``tessera.ask.Source``), as a :class:`Passage`."""
    if isinstance(obj, Passage):
        return obj
    pid = getattr(obj, "passage_id", None) or getattr(obj, "id", None)
    try:
        return Passage(id=str(pid), doc_id=str(obj.doc_id), title=str(getattr(obj, "title", "") or ""), text=str(obj.text),
                       start=int(obj.start), end=int(obj.end))
    except AttributeError as e:
        raise InputError(f"cannot use {type(obj).__name__} as a passage ({e}); pass Passage objects or hits' passages") from None


def build_datastore(lm, passages: Sequence, cache: bool = True, progress: bool = True) -> tuple[TokenDatastore, KeyCacheInfo]:
    """Token keys of ``passages`` (cached on disk per model and passage text) -> a :class:`TokenDatastore`.

    Cache entries live at ``$TESSERA_HOME/nest/keys/<model key>/<hash[:2]>/<hash>.safetensors``
    where the model key is :func:`model_identity` and ``hash`` is
    :func:`passage_key_hash` (title context + passage text): a changed passage gets
    a new entry; an entry whose stored hash does not match is recomputed.  Files are
    written under a temporary name and renamed.
    """
    from tessera import ui

    t0 = time.perf_counter()
    passages = [as_passage(p) for p in passages]
    info = KeyCacheInfo(passages=len(passages))
    parts: list[dict[str, torch.Tensor] | None] = [None] * len(passages)
    todo = []
    for i, p in enumerate(passages):
        if cache:
            parts[i] = _load_keys(key_cache_path(lm, p), p)
        if parts[i] is None:
            todo.append(i)
        else:
            info.cached += 1
    if todo:
        with ui.progress() as bar:
            task = bar.add_task("NEST token keys", total=len(todo), visible=progress)
            for i in todo:
                part = passage_keys(lm, passages[i])
                parts[i] = part
                if cache:
                    _save_atomic(part, key_cache_path(lm, passages[i]),
                                 {"passage_sha256": passage_key_hash(passages[i]), "format": str(KEY_FORMAT),
                                  "passage_id": passages[i].id})
                info.built += 1
                bar.advance(task)
    ds = TokenDatastore(passages, parts, hidden_size=lm.model.config.hidden_size)
    info.tokens = len(ds)
    info.seconds = time.perf_counter() - t0
    return ds, info


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class TokenSource:
    """Where a copied token comes from: ``doc.text[start:end]`` of document ``doc_id``."""

    doc_id: str
    passage_id: str
    start: int
    end: int


@dataclass
class NestToken:
    id: int
    text: str
    source: TokenSource | None = None  # None: chosen by the model (LM or mixture), not copied


@dataclass
class NestSpan:
    """A run of output tokens: copied contiguously from one document, or the model's."""

    text: str
    n_tokens: int
    doc_id: str | None = None
    passage_id: str | None = None
    start: int | None = None  # character span in the document (copied spans)
    end: int | None = None

    @property
    def copied(self) -> bool:
        return self.doc_id is not None


@dataclass
class NestStats:
    """Counts and timings of one generation.

    ``generate_s`` is prefill + decoding (what ``tokens_per_s`` divides by);
    retrieval and key building are reported apart (``retrieval_s``, ``keys_s``).
    ``forward_passes`` counts decoding passes after the prefill.
    ``accepted_span_lengths`` holds, per verified proposal, how many of its tokens
    were accepted (0 when the first was rejected).
    """

    prompt_tokens: int = 0
    new_tokens: int = 0
    copied_tokens: int = 0
    forward_passes: int = 0
    proposals: int = 0
    accepted_span_lengths: list[int] = field(default_factory=list)
    prefill_s: float = 0.0
    generate_s: float = 0.0
    retrieval_s: float = 0.0
    keys_s: float = 0.0
    keys_built: int = 0
    keys_cached: int = 0
    datastore_tokens: int = 0
    stop_reason: str = ""

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.generate_s if self.generate_s > 0 else 0.0

    @property
    def attribution_ratio(self) -> float:
        return self.copied_tokens / self.new_tokens if self.new_tokens else 0.0


@dataclass
class NestResult:
    """Output text, every token with its source, the spans, the passages of the datastore and the stats."""

    text: str
    tokens: list[NestToken]
    spans: list[NestSpan]
    stats: NestStats
    passages: list[Passage] = field(default_factory=list)
    method: str = "nest"

    @property
    def attribution_ratio(self) -> float:
        return self.stats.attribution_ratio

    @property
    def token_ids(self) -> list[int]:
        return [t.id for t in self.tokens]

    def render(self, cite: Callable[[NestSpan], str] | None = None) -> str:
        """The text with a citation after every copied span (default ``" [doc_id]"``)."""
        cite = cite or (lambda s: f" [{s.doc_id}]")
        out = []
        for s in self.spans:
            if s.copied:
                body = s.text.rstrip()
                out.append(body + cite(s) + s.text[len(body):])
            else:
                out.append(s.text)
        return "".join(out)

    def to_dict(self) -> dict:
        stats = asdict(self.stats)
        stats["tokens_per_s"] = self.stats.tokens_per_s
        stats["attribution_ratio"] = self.stats.attribution_ratio
        return {
            "method": self.method,
            "text": self.text,
            "rendered": self.render(),
            "attribution_ratio": self.stats.attribution_ratio,
            "spans": [{**asdict(s), "copied": s.copied} for s in self.spans],
            "tokens": [{"id": t.id, "text": t.text, "source": asdict(t.source) if t.source else None} for t in self.tokens],
            "passages": [{"id": p.id, "doc_id": p.doc_id, "title": p.title, "start": p.start, "end": p.end} for p in self.passages],
            "stats": stats,
        }


def _spans(tokenizer, tokens: list[NestToken]) -> list[NestSpan]:
    groups: list[list[NestToken]] = []
    for t in tokens:
        prev = groups[-1][-1] if groups else None
        same = prev is not None and (
            (prev.source is None and t.source is None)
            or (prev.source is not None and t.source is not None and prev.source.doc_id == t.source.doc_id
                and t.source.start == prev.source.end)
        )
        if same:
            groups[-1].append(t)
        else:
            groups.append([t])
    spans = []
    for g in groups:
        text = tokenizer.decode([t.id for t in g], skip_special_tokens=True)
        src0, src1 = g[0].source, g[-1].source
        if src0 is None:
            spans.append(NestSpan(text=text, n_tokens=len(g)))
        else:
            spans.append(NestSpan(text=text, n_tokens=len(g), doc_id=src0.doc_id, passage_id=src0.passage_id,
                                  start=src0.start, end=src1.end))
    return spans


def make_result(lm, ids: list[int], sources: list[TokenSource | None], stats: NestStats, passages=(), method: str = "nest") -> NestResult:
    tok = lm.tokenizer
    tokens = [NestToken(i, tok.decode([i]), s) for i, s in zip(ids, sources)]
    stats.new_tokens = len(ids)
    stats.copied_tokens = sum(s is not None for s in sources)
    return NestResult(text=tok.decode(ids, skip_special_tokens=True), tokens=tokens, spans=_spans(tok, tokens), stats=stats,
                      passages=list(passages), method=method)


class _Emitter:
    """Streams decoded text pieces to ``on_token`` as tokens are emitted."""

    def __init__(self, tokenizer, on_token: Callable[[str], None] | None):
        self.tokenizer, self.on_token, self.ids, self.emitted = tokenizer, on_token, [], ""

    def add(self, ids: list[int]) -> None:
        self.ids.extend(ids)
        if self.on_token is None:
            return
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if not text.endswith("\ufffd") and len(text) > len(self.emitted):
            self.on_token(text[len(self.emitted):])
            self.emitted = text


# --------------------------------------------------------------------------- decoding


@dataclass
class _Mix:
    """Mixture at ``n`` positions: ``p_m [n, V]``, ``lam [n]``, neighbours ``idx``/``dist`` ``[n, k]`` (or None)."""

    p_m: torch.Tensor
    lam: torch.Tensor
    idx: torch.Tensor | None
    dist: torch.Tensor | None


def _mix(logits: torch.Tensor, h: torch.Tensor, ds: TokenDatastore | None, cfg: NestConfig,
         fixed_lambda: float | None = None, lm_temperature: float | None = None) -> _Mix:
    """The mixture for ``n`` positions from their logits ``[n, V]`` and key-layer states ``[n, d]``."""
    temp = cfg.lm_temperature if lm_temperature is None else lm_temperature
    p_lm = torch.softmax(logits.float() / temp, dim=-1)
    if ds is None or ds.available == 0:
        return _Mix(p_lm, torch.ones(p_lm.shape[0]), None, None)
    dist, idx = ds.search(h, cfg.token_k)
    p_knn = knn_distribution(dist, ds.values[idx], p_lm.shape[-1], dim=h.shape[-1])
    if fixed_lambda is None:
        lam = retrieval_lambda(relative_retrieval_confidence(dist), cfg.alpha, cfg.tau)
    else:
        lam = torch.full((p_lm.shape[0],), float(fixed_lambda))
    return _Mix(mixture(p_lm, p_knn, lam), lam, idx, dist)


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


def _check_prompt(lm, input_ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    if max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if not isinstance(input_ids, torch.Tensor):
        input_ids = torch.tensor([list(input_ids)], dtype=torch.long)
    if input_ids.dim() == 1:
        input_ids = input_ids.unsqueeze(0)
    if input_ids.shape[0] != 1:
        raise InputError(f"NEST decodes one prompt at a time; got a batch of {input_ids.shape[0]}")
    if input_ids.shape[1] == 0:
        raise InputError("the prompt is empty; pass some text to continue")
    lm.check_fits(int(input_ids.shape[1]), max_new_tokens)
    return input_ids.to(lm.device)


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
    """
    from transformers import DynamicCache

    cfg = config or NestConfig()
    ids = _check_prompt(lm, input_ids, max_new_tokens)
    model, stop = lm.model, lm.stop_ids
    if datastore is not None:
        datastore.reset()
    stats = NestStats(prompt_tokens=int(ids.shape[1]), datastore_tokens=len(datastore) if datastore is not None else 0)
    out_ids: list[int] = []
    out_src: list[TokenSource | None] = []
    emit = _Emitter(lm.tokenizer, on_token)

    t0 = time.perf_counter()
    cache = DynamicCache(config=model.config)
    logits, h = _forward(model, ids, cache, last_only=True)
    stats.prefill_s = time.perf_counter() - t0
    cur = _mix(logits, h, datastore, cfg)
    stream = -1  # datastore entry to keep reading from after a span accepted to its end
    stats.stop_reason = "length"

    def push(tokens: list[int], sources: list[TokenSource | None]) -> None:
        out_ids.extend(tokens)
        out_src.extend(sources)
        emit.add(tokens)

    while len(out_ids) < max_new_tokens:
        remaining = max_new_tokens - len(out_ids)
        proposal: list[int] = []
        if datastore is not None and cur.idx is not None:
            if stream >= 0:  # a span accepted to its end: keep reading the corpus, no neighbour selection
                proposal = datastore.read(stream, min(cfg.window, remaining))
            if not proposal and float(cur.lam[-1]) < cfg.delta:
                j = select_neighbour(cur.p_m[-1], cur.idx[-1], datastore.values, datastore.used)
                proposal = datastore.read(j, min(cfg.window, remaining)) if j >= 0 else []
        stream = -1
        p_cur = cur.p_m[-1]
        if proposal:
            stats.proposals += 1
            toks = datastore.values[proposal]
            if relaxed_accept_length(p_cur.unsqueeze(0), toks[:1], cfg.gamma) == 1:
                logits, h = _forward(model, toks.view(1, -1).to(ids.device), cache)
                stats.forward_passes += 1
                span_mix = _mix(logits, h, datastore, cfg)
                n = len(proposal)
                m = 1 + relaxed_accept_length(span_mix.p_m[: n - 1], toks[1:], cfg.gamma) if n > 1 else 1
                accepted, acc_toks = proposal[:m], toks[:m].tolist()
                hit_stop = next((i for i, t in enumerate(acc_toks) if t in stop), None)
                if hit_stop is not None:  # a corpus token that is a stop token ends the generation there
                    accepted, acc_toks = accepted[:hit_stop], acc_toks[:hit_stop]
                stats.accepted_span_lengths.append(len(accepted))
                push(acc_toks, [datastore.source(i) for i in accepted])
                datastore.mark_used(accepted)
                if hit_stop is not None:
                    stats.stop_reason = "eos"
                    break
                if m == n:
                    cur = _Mix(span_mix.p_m[-1:], span_mix.lam[-1:], span_mix.idx[-1:], span_mix.dist[-1:]) \
                        if span_mix.idx is not None else _Mix(span_mix.p_m[-1:], span_mix.lam[-1:], None, None)
                    stream = datastore.next[proposal[-1]]
                    continue
                cache.crop(-(n - m))  # drop the rejected tail (a negative count: transformers 5 semantics)
                p_cur = span_mix.p_m[m - 1]
            else:
                stats.accepted_span_lengths.append(0)
            if len(out_ids) >= max_new_tokens:
                break
        token = int(torch.argmax(p_cur))
        if token in stop:
            stats.stop_reason = "eos"
            break
        push([token], [None])
        if len(out_ids) >= max_new_tokens:
            break
        logits, h = _forward(model, torch.tensor([[token]], device=ids.device), cache)
        stats.forward_passes += 1
        cur = _mix(logits, h, datastore, cfg)
    stats.generate_s = time.perf_counter() - t0
    return make_result(lm, out_ids, out_src, stats, datastore.passages if datastore is not None else (), method="nest")


# --------------------------------------------------------------------------- baselines (same harness)


def _token_by_token(lm, ids: torch.Tensor, max_new_tokens: int, stats: NestStats, on_token, forward, pick) -> list[int]:
    """The baselines' shared loop: ``state = forward(ids, cache)``, then ``token = pick(state)`` and
    ``state = forward([[token]], cache)`` until a stop token or ``max_new_tokens``."""
    from transformers import DynamicCache

    emit = _Emitter(lm.tokenizer, on_token)
    t0 = time.perf_counter()
    cache = DynamicCache(config=lm.model.config)
    state = forward(ids, cache)
    stats.prefill_s = time.perf_counter() - t0
    out: list[int] = []
    while True:
        token = pick(state)
        if token in lm.stop_ids:
            stats.stop_reason = "eos"
            break
        out.append(token)
        emit.add([token])
        if len(out) >= max_new_tokens:
            break
        state = forward(torch.tensor([[token]], device=ids.device), cache)
        stats.forward_passes += 1
    stats.generate_s = time.perf_counter() - t0
    return out


@torch.inference_mode()
def greedy_generate(lm, input_ids: torch.Tensor, max_new_tokens: int = 128, on_token: Callable[[str], None] | None = None,
                    method: str = "greedy") -> NestResult:
    """Plain greedy decoding of the same LM with a KV cache (one forward pass per token); no attribution."""
    ids = _check_prompt(lm, input_ids, max_new_tokens)
    stats = NestStats(prompt_tokens=int(ids.shape[1]), stop_reason="length")
    out = _token_by_token(
        lm, ids, max_new_tokens, stats, on_token,
        forward=lambda x, cache: lm.model(input_ids=x, cache=cache, use_cache=True, logits_to_keep=1).logits[0, -1],
        pick=lambda logits: int(torch.argmax(logits)))
    return make_result(lm, out, [None] * len(out), stats, method=method)


KNN_LM_LAMBDA = 0.25
"""kNN-LM's interpolation weight *of the kNN distribution* (Khandelwal et al. 2020; NEST's baseline)."""


@torch.inference_mode()
def knn_lm_generate(lm, datastore: TokenDatastore, input_ids: torch.Tensor, max_new_tokens: int = 128,
                    config: NestConfig | None = None, knn_lambda: float | None = KNN_LM_LAMBDA,
                    on_token: Callable[[str], None] | None = None) -> NestResult:
    """Token-by-token greedy decoding of a kNN mixture over the same datastore; no spans, no masking.

    ``knn_lambda=0.25`` is the kNN-LM baseline: ``p = 0.75 p_LM + 0.25 p_kNN`` with
    ``p_LM`` at temperature 1 and ``token_k`` neighbours (p_kNN as
    :func:`knn_distribution`, so both methods read the same keys the same way).
    ``knn_lambda=None`` decodes NEST's own mixture (adaptive lambda from the RRC,
    ``config.lm_temperature``): NEST with nothing accepted reduces to this.
    No token is attributed (the kNN-LM has no notion of a copied span).
    """
    cfg = config or NestConfig()
    ids = _check_prompt(lm, input_ids, max_new_tokens)
    datastore.reset()
    fixed = None if knn_lambda is None else 1.0 - knn_lambda
    temp = None if knn_lambda is None else 1.0
    stats = NestStats(prompt_tokens=int(ids.shape[1]), datastore_tokens=len(datastore), stop_reason="length")
    out = _token_by_token(
        lm, ids, max_new_tokens, stats, on_token,
        forward=lambda x, cache: _forward(lm.model, x, cache, last_only=True),
        pick=lambda state: int(torch.argmax(_mix(*state, datastore, cfg, fixed_lambda=fixed, lm_temperature=temp).p_m[-1])))
    return make_result(lm, out, [None] * len(out), stats, datastore.passages,
                       method="knn-lm" if knn_lambda is not None else "nest-mixture-greedy")


def rag_prompt(passages: Sequence, prompt: str) -> str:
    """In-context RAG for text continuation: the passages (title, text), a blank line, then the prompt."""
    blocks = []
    for p in (as_passage(x) for x in passages):
        blocks.append(f"{p.title}\n{p.text.strip()}" if p.title else p.text.strip())
    return "\n\n".join(blocks + [prompt]) if blocks else prompt


@torch.inference_mode()
def prompt_lookup_generate(lm, input_ids: torch.Tensor, max_new_tokens: int = 128, num_tokens: int = 10) -> NestResult:
    """transformers' prompt-lookup decoding (``model.generate(..., prompt_lookup_num_tokens=...)``), greedy.

    Drafts are n-grams copied from the prompt (here: the passages plus the prompt,
    see :func:`rag_prompt`) and verified by the LM, so the output equals greedy
    decoding of the same prompt.  ``forward_passes`` is not observable and left 0.
    """
    ids = _check_prompt(lm, input_ids, max_new_tokens)
    stats = NestStats(prompt_tokens=int(ids.shape[1]))
    tok = lm.tokenizer
    t0 = time.perf_counter()
    out = lm.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_new_tokens,
                            prompt_lookup_num_tokens=num_tokens, pad_token_id=tok.pad_token_id,
                            eos_token_id=sorted(lm.stop_ids) or None)
    stats.generate_s = time.perf_counter() - t0
    new = out[0, ids.shape[1]:].tolist()
    cut = next((i for i, t in enumerate(new) if t in lm.stop_ids), None)
    stats.stop_reason = "eos" if cut is not None else "length"
    new = new[:cut] if cut is not None else new
    return make_result(lm, new, [None] * len(new), stats, method="prompt-lookup")


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
    _check_prompt(model, ids, max_new_tokens)  # fail before any retrieval or key building
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
    ids = _check_prompt(model, ids, max_new_tokens)
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
