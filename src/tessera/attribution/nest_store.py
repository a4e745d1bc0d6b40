"""NEST's plumbing: token keys and their disk cache, the token datastore, attributed results.

The method itself is :mod:`tessera.attribution.nest`; this module holds what it runs on:

- **token keys** (the second retrieval stage's keys, NEST section 3.1): the LM's
  hidden state at :data:`KEY_LAYER` for every passage token, value = the next token,
  with the value token's character span (fast tokenizer offsets mapped through the
  passage's ``start``): :func:`passage_keys`;
- **the key cache**: keys computed once per model and passage text and stored under
  ``$TESSERA_HOME/nest/keys/<model key>/`` (:func:`model_identity`,
  :func:`passage_key_hash`, :func:`key_cache_path`), written atomically with
  :func:`tessera.config.atomic_file`;
- **the datastore**: :class:`TokenDatastore` (exact L2 search, masking of copied text,
  corpus continuations) built by :func:`build_datastore`;
- **results**: every output token with its source (:class:`TokenSource`), runs of
  tokens grouped into :class:`NestSpan` s, :class:`NestStats` and :class:`NestResult`;
- shared decoding helpers: :func:`lm_forward` (logits and key-layer states in one
  pass), :func:`check_prompt`, :class:`Emitter` (streaming).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from tessera.data.chunking import Passage
from tessera.errors import InputError
from tessera.hub import tessera_home

KEY_LAYER = -2
"""``hidden_states[-2]``: the output of the second-to-last decoder layer (NEST's code)."""

KEY_FORMAT = 1  # bump when the key file layout or the way keys are computed changes


# --------------------------------------------------------------------------- token keys and their cache


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


@torch.inference_mode()
def passage_keys(lm, passage: Passage) -> dict[str, torch.Tensor]:
    """Keys, values and passage-relative character spans of one passage's tokens.

    The sequence is ``title + "\\n" + text`` (title omitted when empty).  Key ``i``
    is the hidden state at token ``i`` (:data:`KEY_LAYER`), value the token
    ``i + 1``; an entry is kept when its value token lies inside the passage text
    and ``i >= 1`` (see :mod:`tessera.attribution.nest` on the first position).  Returns
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

    from tessera.config import atomic_file

    with atomic_file(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)


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


# --------------------------------------------------------------------------- shared decoding helpers


def lm_forward(model, ids: torch.Tensor, cache=None, last_only: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward pass -> (logits ``[n, V]`` fp32, key-layer hidden states ``[n, d]`` fp32) for batch row 0."""
    out = model(input_ids=ids, cache=cache, use_cache=cache is not None, output_hidden_states=KEY_LAYER,
                logits_to_keep=1 if last_only else 0)
    h = out.hidden_states[KEY_LAYER]
    if last_only:
        h = h[:, -1:]
    return out.logits[0].float(), h[0].float()


def check_prompt(lm, input_ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """``input_ids`` as one ``[1, T]`` prompt on the LM's device; raises when it is empty, batched or too long."""
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


class Emitter:
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
