"""tessera's decoding and scoring engine for Llama-family transformers models.

The engine runs the model's own modules (embedding, norms, projections, MLP, rotary
embedding, LM head) and owns only what makes batched CPU inference slow in a generic
stack: the key/value cache and the attention mask.

- **Static KV cache** (:class:`KVBuffer`): one preallocated ``[B, kv_heads, capacity,
  head_dim]`` tensor per layer and a ``[B, capacity]`` validity mask.  A decoding step
  writes one column; nothing is concatenated (``DynamicCache`` copies the whole cache
  on every token, which at batch 32 and 500-token prompts moves more bytes than the
  weights).
- **Shared prefixes computed once** (:func:`prefill_rows`): rows are laid out as
  ``[anchor prefix | hole | own suffix]``.  The anchor's KV (e.g. the instruction and
  one-shot example that every ReasonIR synthesis prompt shares, or the full context
  of which SelfCite's ablations drop sentences) is computed once at batch 1 and copied
  into every row; a row keeps the first ``p_r`` anchor columns it shares and masks the
  rest (the hole), and only its own suffix is run through the model.  Position ids are
  per row, so the model sees exactly the token sequence it would see unpadded.
- **Rows leave the batch** (:meth:`KVBuffer.keep`): a finished row is compacted out,
  so the batch never computes for rows that have stopped.
- **Logits only where needed**: the LM head (49k x 576 for SmolLM2) runs on the last
  column when decoding and on the scored tokens when scoring.

Greedy outputs equal ``model.generate``'s on the embedded model (tested); the float
sums inside a matrix product may differ in the last bits when a batch is laid out
differently, which ``benchmarks/lm.py`` measures as the share of identical rows.
Architectures the engine does not know (``supports(model)`` is False) keep
transformers' own forward (``engine="hf"`` in :class:`~tessera.lm.local.LocalLM`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

SUPPORTED_TYPES = ("llama", "mistral", "qwen2")
MIN_SHARED = 16  # a shared prefix shorter than this is not worth an anchor pass


def supports(model) -> bool:
    """Whether the engine can run ``model`` (a Llama-shaped causal LM without sliding windows or q/k norms)."""
    cfg = getattr(model, "config", None)
    inner = getattr(model, "model", None)
    if cfg is None or inner is None or getattr(cfg, "model_type", None) not in SUPPORTED_TYPES:
        return False
    if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True) and cfg.model_type != "llama":
        return False
    if not all(hasattr(inner, a) for a in ("embed_tokens", "layers", "norm", "rotary_emb")) or not hasattr(model, "lm_head"):
        return False
    attn = inner.layers[0].self_attn
    return all(hasattr(attn, a) for a in ("q_proj", "k_proj", "v_proj", "o_proj")) and not hasattr(attn, "q_norm")


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class KVBuffer:
    """Preallocated keys/values for ``B`` rows and ``capacity`` columns, plus which columns each row attends to."""

    def __init__(self, model, batch: int, capacity: int):
        cfg = model.config
        p = next(model.parameters())
        self.n_layers = len(model.model.layers)
        attn = model.model.layers[0].self_attn
        self.head_dim = int(getattr(attn, "head_dim", cfg.hidden_size // cfg.num_attention_heads))
        self.kv_heads = int(cfg.num_key_value_heads)
        shape = (batch, self.kv_heads, capacity, self.head_dim)
        self.k = [torch.empty(shape, dtype=p.dtype, device=p.device) for _ in range(self.n_layers)]
        self.v = [torch.empty(shape, dtype=p.dtype, device=p.device) for _ in range(self.n_layers)]
        self.valid = torch.zeros((batch, capacity), dtype=torch.bool, device=p.device)
        self.used = 0  # columns written so far (the same for every row)
        self.capacity = capacity

    @property
    def batch(self) -> int:
        return self.valid.shape[0]

    def keep(self, rows: torch.Tensor | list[int]) -> None:
        """Keep only ``rows`` (compaction after rows finished); copies the used columns once."""
        idx = torch.as_tensor(rows, dtype=torch.long, device=self.valid.device)
        u = self.used
        for layer in range(self.n_layers):
            k = self.k[layer].new_empty((len(idx), self.kv_heads, self.capacity, self.head_dim))
            v = torch.empty_like(k)
            k[:, :, :u] = self.k[layer][idx, :, :u]
            v[:, :, :u] = self.v[layer][idx, :, :u]
            self.k[layer], self.v[layer] = k, v
        self.valid = self.valid[idx].clone()

    @classmethod
    def from_cache(cls, model, cache, length: int) -> "KVBuffer | None":
        """The first ``length`` columns of row 0 of a transformers ``DynamicCache`` (e.g. the one generation
        filled) as a batch-1 buffer; ``None`` when the cache is not a plain per-layer key/value cache."""
        layers = getattr(cache, "layers", None)
        if not layers or len(layers) != len(model.model.layers) or length <= 0:
            return None
        if any(getattr(layer, "keys", None) is None or layer.keys.shape[2] < length for layer in layers):
            return None
        kv = cls(model, 1, length)
        for i, layer in enumerate(layers):
            kv.k[i][:] = layer.keys[:1, :, :length]
            kv.v[i][:] = layer.values[:1, :, :length]
        kv.valid[:] = True
        kv.used = length
        return kv

    def copy_prefix(self, src: "KVBuffer", length: int) -> None:
        """Columns ``[0, length)`` of ``src``'s row 0 into every row here (the shared anchor prefix)."""
        for layer in range(self.n_layers):
            self.k[layer][:, :, :length] = src.k[layer][:1, :, :length]
            self.v[layer][:, :, :length] = src.v[layer][:1, :, :length]


@torch.inference_mode()
def forward(model, kv: KVBuffer, ids: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor,
            logits_last: int = 1) -> torch.Tensor | None:
    """Run ``ids`` [B, T] as the next ``T`` columns of ``kv``; returns logits [B, logits_last, V] of the last columns
    (``logits_last=0``: no LM head).

    ``positions`` [B, T] are the rotary positions, ``valid`` [B, T] which new columns are real tokens (a
    padding column is never attended to by another).  A query attends to valid columns at or before its own;
    every query also attends to itself, so a padding query has a defined (unused) output.
    """
    inner = model.model
    B, T = ids.shape
    c0 = kv.used
    end = c0 + T
    if end > kv.capacity:
        raise ValueError(f"KV buffer holds {kv.capacity} columns, {end} needed")
    kv.valid[:, c0:end] = valid
    # the mask: none when every column so far is a real token (a causal prefill from column 0 uses SDPA's
    # causal kernel, a one-token step attends to everything), else valid columns at or before the query
    dense = bool(kv.valid[:, :end].all())
    causal = dense and c0 == 0 and T > 1
    mask = None
    if not dense or (T > 1 and not causal):
        cols = torch.arange(end, device=ids.device)
        qcols = torch.arange(c0, end, device=ids.device)
        mask = kv.valid[:, None, None, :end] & (cols[None, None, None, :] <= qcols[None, None, :, None])
        mask = mask | (cols[None, None, None, :] == qcols[None, None, :, None])
    h = inner.embed_tokens(ids)
    cos, sin = inner.rotary_emb(h, positions)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    for li, layer in enumerate(inner.layers):
        attn = layer.self_attn
        x = layer.input_layernorm(h)
        q = _linear(attn.q_proj, x).view(B, T, -1, kv.head_dim).transpose(1, 2)
        k = _linear(attn.k_proj, x).view(B, T, -1, kv.head_dim).transpose(1, 2)
        v = _linear(attn.v_proj, x).view(B, T, -1, kv.head_dim).transpose(1, 2)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        kv.k[li][:, :, c0:end] = k
        kv.v[li][:, :, c0:end] = v
        o = _attend(q, kv.k[li][:, :, :end], kv.v[li][:, :, :end], mask, causal, attn.scaling)
        h = h + _linear(attn.o_proj, o.transpose(1, 2).reshape(B, T, -1))
        h = h + _mlp(layer.mlp, layer.post_attention_layernorm(h))
    kv.used = end
    if logits_last <= 0:
        return None
    return model.lm_head(inner.norm(h[:, -logits_last:]))


SKINNY_ROWS = 64  # up to this many rows, y = (W x^T)^T: on this CPU 2-3x faster than F.linear for 2-4 rows


def _linear(mod: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``mod(x)``; for few rows (decoding) computed as ``W @ x^T``, which MKL runs far faster than
    ``x @ W^T`` for 2-16 rows here (both read the weight once)."""
    rows = x.numel() // x.shape[-1]
    if rows > SKINNY_ROWS or x.device.type != "cpu" or not isinstance(mod, torch.nn.Linear):
        return mod(x)
    y = torch.mm(mod.weight, x.reshape(rows, -1).t()).t()
    if mod.bias is not None:
        y = y + mod.bias
    return y.contiguous().view(*x.shape[:-1], -1)


def _mlp(mlp, x: torch.Tensor) -> torch.Tensor:
    """The gated MLP ``down(act(gate(x)) * up(x))`` through :func:`_linear` (Llama, Qwen2, Mistral)."""
    if not all(hasattr(mlp, a) for a in ("gate_proj", "up_proj", "down_proj", "act_fn")):
        return mlp(x)
    return _linear(mlp.down_proj, mlp.act_fn(_linear(mlp.gate_proj, x)) * _linear(mlp.up_proj, x))


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, causal: bool,
            scale: float) -> torch.Tensor:
    """SDPA with grouped-query heads.  A one-token step packs the query heads of each key/value head into
    rows (as transformers does for decoding), so keys and values are never repeated per query head."""
    B, H, T, D = q.shape
    kvh = k.shape[1]
    if T == 1 and H != kvh:
        o = F.scaled_dot_product_attention(q.reshape(B, kvh, H // kvh, D), k, v, attn_mask=mask, scale=scale)
        return o.reshape(B, H, 1, D)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=H != kvh)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


@dataclass
class Prefilled:
    kv: KVBuffer
    logits: torch.Tensor  # [B, logits_last, V]
    next_pos: torch.Tensor  # [B] rotary position of each row's next token
    computed_tokens: int  # tokens run through the model (the suffixes)
    passes: int = 1  # forward passes (one per group of similar suffix lengths)


def anchor_kv(model, anchor: Sequence[int], capacity: int | None = None) -> KVBuffer:
    """The anchor's KV at batch 1 (computed once, copied into every row that shares a prefix with it)."""
    kv = KVBuffer(model, 1, capacity or max(1, len(anchor)))
    if anchor:
        x = torch.tensor([list(anchor)], dtype=torch.long, device=kv.valid.device)
        forward(model, kv, x, torch.arange(len(anchor), device=x.device)[None], torch.ones_like(x, dtype=torch.bool),
                logits_last=0)
    return kv


def length_groups(lengths: Sequence[int], chunk_tokens: int = 8192, max_waste: float = 0.2) -> list[list[int]]:
    """Row indices grouped for prefill: similar lengths together (a row shorter than ``1 - max_waste`` of its
    group's longest starts a new group) and at most ``chunk_tokens`` padded tokens per group."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    groups: list[list[int]] = []
    for i in order:
        if groups:
            g = groups[-1]
            top = lengths[g[0]]
            if lengths[i] >= (1 - max_waste) * top and (len(g) + 1) * top <= chunk_tokens:
                g.append(i)
                continue
        groups.append([i])
    return groups


def prefill_rows(model, rows: Sequence[Sequence[int]], shared: Sequence[int], anchor: KVBuffer | None,
                 extra_capacity: int, logits_last: int = 1, pad_id: int = 0, chunk_tokens: int = 8192,
                 max_waste: float = 0.2, before_pass: Callable[[], None] | None = None) -> Prefilled:
    """Lay out ``rows`` as ``[anchor prefix | hole | suffix]`` and run their suffixes through the model.

    ``shared[r]`` is how many leading tokens row ``r`` shares with the anchor (at most ``len(row) - 1``);
    ``anchor`` holds the anchor's KV for at least ``max(shared)`` columns.  Suffixes are left-padded, so every
    row's last token is in the last column and ``logits_last`` columns of logits are returned for all rows.
    Suffixes of similar length run together (:func:`length_groups`), so a batch of mixed lengths does not
    compute padding; each group's keys and values are then copied into the shared buffer.
    ``extra_capacity`` columns are left free for decoding; ``before_pass()`` is called before every forward pass.
    """
    B = len(rows)
    P = max(shared) if anchor is not None else 0
    starts = [s if anchor is not None else 0 for s in shared]
    suffixes = [list(r[s:]) for r, s in zip(rows, starts)]
    S = max(len(x) for x in suffixes)
    device = next(model.parameters()).device
    kv = KVBuffer(model, B, P + S + extra_capacity)
    groups = length_groups([len(x) for x in suffixes], chunk_tokens, max_waste)
    logits = None
    if P and len(groups) > 1:
        kv.copy_prefix(anchor, P)
        for r in range(B):
            kv.valid[r, :starts[r]] = True
    for g in groups:
        Sg = max(len(suffixes[i]) for i in g)
        sub = kv if len(groups) == 1 else KVBuffer(model, len(g), P + Sg)
        if P:
            sub.copy_prefix(anchor, P)
            for r, i in enumerate(g if sub is not kv else range(B)):
                sub.valid[r, :starts[i]] = True
            sub.used = P
        members = g if sub is not kv else list(range(B))
        ids = torch.full((len(members), Sg), int(pad_id), dtype=torch.long)
        pos = torch.zeros((len(members), Sg), dtype=torch.long)
        valid = torch.zeros((len(members), Sg), dtype=torch.bool)
        for r, i in enumerate(members):
            n = len(suffixes[i])
            ids[r, Sg - n:] = torch.tensor(suffixes[i], dtype=torch.long)
            pos[r, Sg - n:] = torch.arange(starts[i], starts[i] + n)
            valid[r, Sg - n:] = True
        if before_pass is not None:
            before_pass()
        lg = forward(model, sub, ids.to(device), pos.to(device), valid.to(device), logits_last=logits_last)
        if sub is kv:
            logits = lg
            break
        if logits is None and lg is not None:
            logits = lg.new_zeros((B, logits_last, lg.shape[-1]))
        if lg is not None:
            logits[g, logits_last - lg.shape[1]:] = lg
        idx = torch.tensor(g, dtype=torch.long, device=device)
        lo = P + S - Sg
        for layer in range(kv.n_layers):
            kv.k[layer][idx, :, lo:P + S] = sub.k[layer][:, :, P:P + Sg]
            kv.v[layer][idx, :, lo:P + S] = sub.v[layer][:, :, P:P + Sg]
            if lo > P:  # columns no row of this group uses: zeros, never garbage, under the mask
                kv.k[layer][idx, :, P:lo] = 0
                kv.v[layer][idx, :, P:lo] = 0
        kv.valid[idx, P:P + S] = False
        kv.valid[idx, lo:P + S] = sub.valid[:, P:P + Sg]
    kv.used = P + S
    next_pos = torch.tensor([len(r) for r in rows], dtype=torch.long, device=device)
    return Prefilled(kv, logits, next_pos, sum(len(s) for s in suffixes), len(groups))


def shared_lengths(rows: Sequence[Sequence[int]], anchor: Sequence[int], keep_last: Sequence[int] | int = 1) -> list[int]:
    """How many leading tokens each row takes from the anchor's KV: its common prefix with the anchor, leaving at
    least ``keep_last`` tokens (the ones whose logits are needed) to run."""
    keep = [keep_last] * len(rows) if isinstance(keep_last, int) else list(keep_last)
    return [max(0, min(common_prefix(r, anchor), len(r) - k)) for r, k in zip(rows, keep)]


# ------------------------------------------------------------------------------------------ decoding
@dataclass
class RowState:
    tokens: list[int]
    done: bool = False
    reason: str = "length"
    drafted: int = 0  # prompt-lookup speculation: draft tokens proposed / accepted
    accepted: int = 0


def decode(model, prompts: Sequence[Sequence[int]], max_new_tokens: int, stop_ids: set[int],
           pick: Callable[[torch.Tensor, list[int], list["RowState"]], torch.Tensor], *, pad_id: int = 0,
           stop_when: Callable[[int, list[int]], bool] | None = None, stop_check_every: int = 4,
           compact_fraction: float = 0.25, share_prefix: bool = True,
           lookup: int = 0) -> Iterator[tuple[list[int], list[RowState]]]:
    """Greedy or sampled decoding of several prompts at once; yields after every step
    ``(rows that received a token this step, all row states)``.

    ``pick(logits [b, V], row_ids, states)`` chooses the next token of each active row.  A row ends on a stop token
    (not kept), when ``stop_when(row, new_tokens)`` says so (checked every ``stop_check_every`` tokens) or at
    ``max_new_tokens``.  Finished rows are compacted out of the batch once they make up
    ``compact_fraction`` of it.  The longest common prefix of all prompts is computed once
    (``share_prefix``).

    ``lookup > 0`` (one prompt, greedy ``pick`` only): prompt-lookup speculation (:func:`decode_lookup`).
    """
    if lookup > 0 and len(prompts) == 1:
        yield from decode_lookup(model, prompts[0], max_new_tokens, stop_ids, pick, lookup, stop_when=stop_when,
                                 stop_check_every=stop_check_every, pad_id=pad_id)
        return
    states = [RowState([]) for _ in prompts]
    if max_new_tokens <= 0 or not prompts:
        return
    if share_prefix and len(prompts) > 1:
        lcp = min(common_prefix(prompts[0], p) for p in prompts[1:])
        lcp = min(lcp, min(len(p) for p in prompts) - 1)
        lcp = lcp if lcp >= MIN_SHARED else 0
    else:
        lcp = 0
    if lcp > 0:
        anc = anchor_kv(model, prompts[0][:lcp])
        pre = prefill_rows(model, prompts, [lcp] * len(prompts), anc, max_new_tokens, pad_id=pad_id)
        del anc
    else:
        pre = prefill_rows(model, prompts, [0] * len(prompts), None, max_new_tokens, pad_id=pad_id)
    kv, logits, pos = pre.kv, pre.logits[:, -1], pre.next_pos
    active = list(range(len(prompts)))  # batch row -> prompt index
    device = pos.device
    for step in range(max_new_tokens):
        chosen = pick(logits, active, states).tolist()
        got = []
        for b, (row, tok) in enumerate(zip(active, chosen)):
            st = states[row]
            if st.done:
                continue
            if tok in stop_ids:
                st.done, st.reason = True, "eos"
                continue
            st.tokens.append(int(tok))
            got.append(row)
            if len(st.tokens) >= max_new_tokens:
                st.done, st.reason = True, "length"
            elif stop_when is not None and len(st.tokens) % stop_check_every == 0 and stop_when(row, st.tokens):
                st.done, st.reason = True, "stop_when"
        yield got, states
        live = [b for b, row in enumerate(active) if not states[row].done]
        if not live:
            return
        if len(active) - len(live) >= max(1, int(compact_fraction * len(active))):
            kv.keep(live)
            pos = pos[live]
            active = [active[b] for b in live]
            chosen = [chosen[b] for b in live]
        x = torch.tensor(chosen, dtype=torch.long, device=device)[:, None]
        logits = forward(model, kv, x, pos[:, None], torch.ones_like(x, dtype=torch.bool))[:, -1]
        pos = pos + 1


class NgramIndex:
    """Where each n-gram (n <= ``n_max``) of a growing token list last occurred with a token after it."""

    def __init__(self, tokens: Sequence[int], n_max: int = 3):
        self.tokens: list[int] = []
        self.n_max = n_max
        self.last: dict[tuple[int, ...], int] = {}
        for t in tokens:
            self.append(t)

    def append(self, token: int) -> None:
        self.tokens.append(int(token))
        i = len(self.tokens) - 1  # the n-grams ending just before the new token now have a follower
        for n in range(1, self.n_max + 1):
            if i - n >= 0:
                self.last[tuple(self.tokens[i - n:i])] = i - n

    def draft(self, k: int) -> list[int]:
        """The ``k`` tokens that followed the most recent earlier occurrence of the last n-gram, longest n first."""
        L = len(self.tokens)
        for n in range(min(self.n_max, L), 0, -1):
            s = self.last.get(tuple(self.tokens[L - n:]))
            if s is not None:
                return self.tokens[s + n:s + n + k]
        return []


def decode_lookup(model, prompt: Sequence[int], max_new_tokens: int, stop_ids: set[int], pick, k: int, *,
                  stop_when=None, stop_check_every: int = 4, pad_id: int = 0, n_max: int = 3):
    """Greedy batch-1 decoding with prompt-lookup speculation (Saxena 2023, "Prompt Lookup Decoding"; transformers'
    ``prompt_lookup_num_tokens``).

    After each token the continuation of the last n-gram's most recent earlier occurrence in prompt + output
    (up to ``k`` tokens) is proposed and checked in the same forward pass that runs the token: on this CPU one
    pass costs about the same for 1 or 10 tokens (the weights are read once), so every accepted draft token is
    nearly free.  A draft token is kept only while it equals the model's greedy choice, so the output is
    greedy decoding's; rejected columns are overwritten by the next pass.  Yields like :func:`decode`; the
    statistics of accepted tokens are on the last yielded state (``RowState.drafted``, ``accepted``).
    """
    st = RowState([])
    states = [st]
    index = NgramIndex(prompt, n_max)
    pre = prefill_rows(model, [prompt], [0], None, max_new_tokens, pad_id=pad_id)
    kv, logits, pos = pre.kv, pre.logits[:, -1], int(pre.next_pos[0])
    device = logits.device
    st.drafted = st.accepted = 0

    def emit(tok: int) -> bool:
        """Book-keep one token; True when the row has ended."""
        if tok in stop_ids:
            st.done, st.reason = True, "eos"
            return True
        st.tokens.append(tok)
        index.append(tok)
        if len(st.tokens) >= max_new_tokens:
            st.done, st.reason = True, "length"
        elif stop_when is not None and len(st.tokens) % stop_check_every == 0 and stop_when(0, st.tokens):
            st.done, st.reason = True, "stop_when"
        return st.done

    while True:
        tok = int(pick(logits, [0], states)[0])
        ended = emit(tok)
        yield ([0] if tok not in stop_ids else []), states
        if ended:
            return
        draft = index.draft(min(k, max_new_tokens - len(st.tokens)))
        x = torch.tensor([[tok] + draft], dtype=torch.long, device=device)
        c0 = kv.used
        out = forward(model, kv, x, torch.arange(pos, pos + x.shape[1], device=device)[None],
                      torch.ones_like(x, dtype=torch.bool), logits_last=x.shape[1])[0]
        j = 0
        if draft:
            preds = out[:-1].argmax(-1).tolist()
            while j < len(draft) and preds[j] == draft[j]:
                j += 1
            st.drafted += len(draft)
            st.accepted += j
            for d in draft[:j]:
                ended = emit(d)
                yield ([0] if d not in stop_ids else []), states
                if ended:
                    return
        kv.used = c0 + 1 + j
        pos += 1 + j
        logits = out[j:j + 1]


# ------------------------------------------------------------------------------------------ scoring
def anchor_groups(seqs: Sequence[Sequence[int]], keep: Sequence[int]) -> list[tuple[list[int], list[int]]]:
    """Rows grouped around anchors: ``[(anchor tokens, row indices)]``.

    Longest rows first, a row joins the anchor it shares the longest prefix with, unless that prefix is no
    longer than what every row shares (e.g. an instruction header) and the row is at least half as long as
    the longest row: then it starts a group of its own.  Rows built from one context (SelfCite's ablations of
    one prompt) so share one anchor, long rows of other contexts get their own, and short rows that share
    only the header join any group (the same tokens run either way).
    """
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    everyone = min((common_prefix(seqs[order[0]], seqs[i]) for i in order[1:]), default=0)
    longest = len(seqs[order[0]])
    groups: list[tuple[list[int], list[int]]] = []
    for i in order:
        usable = len(seqs[i]) - keep[i]
        best, best_len = None, -1
        for g, (anc, _) in enumerate(groups):
            n = min(common_prefix(seqs[i], anc), usable)
            if n > best_len:
                best, best_len = g, n
        if best is None or (best_len <= everyone and 2 * len(seqs[i]) >= longest):
            groups.append((list(seqs[i]), [i]))
        else:
            groups[best][1].append(i)
    return groups


def score_rows(model, rows: Sequence[tuple[Sequence[int], int]], batch_size: int = 8,
               anchor: Sequence[int] | None = None, pad_id: int = 0, anchor_buffer: KVBuffer | None = None,
               before_pass: Callable[[], None] | None = None) -> tuple[list[list[float]], dict]:
    """Log-probabilities of the last ``n`` tokens of each ``(ids, n)`` row.

    Rows are grouped around anchors (:func:`anchor_groups`; or the one ``anchor`` given): each anchor's KV is
    computed once and every row of its group reuses the KV of its common prefix with it, so only the rest of
    the row runs.  Within a group rows are sorted by that shared length so a batch wastes few masked columns.
    ``anchor_buffer``: the given anchor's KV when the caller already has it (e.g. from generation; it must
    hold ``len(anchor)`` columns), so it is not run again.  ``before_pass()`` is called before every forward
    pass (cancellation).  Returns the scores in input order and ``{"tokens": tokens in the rows,
    "computed_tokens": tokens run through the model, "passes": forward passes}``.
    """
    if not rows:
        return [], {"tokens": 0, "computed_tokens": 0, "passes": 0}
    seqs = [list(r) for r, _ in rows]
    ns = [int(n) for _, n in rows]
    for s, n in zip(seqs, ns):
        if n < 1 or n >= len(s):
            raise ValueError(f"a row of {len(s)} tokens cannot score its last {n}: need 1 <= n < length")
    if anchor is not None:
        groups = [(list(anchor), list(range(len(seqs))))]
    else:
        groups = anchor_groups(seqs, [n + 1 for n in ns])
        anchor_buffer = None
    out: list[list[float] | None] = [None] * len(seqs)
    stats = {"tokens": sum(map(len, seqs)), "computed_tokens": 0, "passes": 0, "anchors": len(groups)}
    for anc_tokens, members in groups:
        _score_group(model, seqs, ns, members, anc_tokens, anchor_buffer, batch_size, pad_id, before_pass, out, stats)
    return out, stats  # type: ignore[return-value]


def _score_group(model, seqs, ns, members, anchor, anchor_buffer, batch_size, pad_id, before_pass, out, stats) -> None:
    shared = dict(zip(members, shared_lengths([seqs[i] for i in members], anchor, [ns[i] + 1 for i in members])))
    if anchor_buffer is None and max(shared.values()) < MIN_SHARED:
        shared = {i: 0 for i in members}
    P = max(shared.values())
    if anchor_buffer is not None:
        if anchor_buffer.used < len(anchor):
            raise ValueError(f"the anchor buffer holds {anchor_buffer.used} columns, the anchor has {len(anchor)} tokens")
        anc = anchor_buffer if P > 0 else None
    elif P > 0:
        if before_pass is not None:
            before_pass()
        anc = anchor_kv(model, anchor[:P])
        stats["passes"] += 1
        stats["computed_tokens"] += P
    else:
        anc = None
    order = sorted(members, key=lambda i: (-shared[i], -len(seqs[i])))
    for s in range(0, len(order), batch_size):
        chunk = order[s:s + batch_size]
        n_max = max(ns[i] for i in chunk)
        pre = prefill_rows(model, [seqs[i] for i in chunk], [shared[i] for i in chunk], anc, 0,
                           logits_last=n_max + 1, pad_id=pad_id, before_pass=before_pass)
        stats["computed_tokens"] += pre.computed_tokens
        stats["passes"] += pre.passes
        lp = torch.log_softmax(pre.logits[:, :-1].float(), -1)
        for r, i in enumerate(chunk):
            n = ns[i]
            tgt = torch.tensor(seqs[i][-n:], device=lp.device)
            out[i] = lp[r, -n:].gather(-1, tgt[:, None])[:, 0].tolist()


def last_logprobs(model, prompts: Sequence[Sequence[int]], batch_size: int = 8, pad_id: int = 0) -> torch.Tensor:
    """Next-token log-probabilities [N, V] after each prompt; the prompts' common prefix with the longest
    prompt is computed once."""
    seqs = [list(p) for p in prompts]
    anchor = max(seqs, key=len)
    shared = shared_lengths(seqs, anchor, 1)
    if max(shared) < MIN_SHARED:
        shared = [0] * len(seqs)
    P = max(shared)
    anc = anchor_kv(model, anchor[:P]) if P > 0 else None
    order = sorted(range(len(seqs)), key=lambda i: (-shared[i], -len(seqs[i])))
    out = [None] * len(seqs)
    for s in range(0, len(order), batch_size):
        chunk = order[s:s + batch_size]
        pre = prefill_rows(model, [seqs[i] for i in chunk], [shared[i] for i in chunk], anc, 0, pad_id=pad_id)
        lp = torch.log_softmax(pre.logits[:, -1].float(), -1)
        for r, i in enumerate(chunk):
            out[i] = lp[r]
    return torch.stack(out)  # type: ignore[arg-type]
