"""Continuous batching on llama.cpp: concurrent generations decode together, one ``llama_decode`` per step.

:class:`ContinuousBatcher` owns a second llama.cpp context over the same (already loaded) model
weights, with one KV cache of its own per slot (``n_seq_max`` = ``max_batch`` streams of ``slot_ctx``
cells each, not one unified cache).  One thread runs the loop; callers on any thread iterate :meth:`stream`:

- **A request joins at a token boundary.**  Each step decodes one token for every running row (one
  ``llama_decode``), then feeds the next chunk (at most ``n_batch`` tokens) of one joining row's prompt,
  so a long prompt never stalls the others for more than one chunk (chunked prefill, as llama.cpp's own
  server does).  Prompts go one row at a time because a prompt's logits change when another prompt
  shares its ubatch; this way every row's logits are bit-identical to running it alone.
- **Each row keeps its own settings**: max new tokens, stop tokens, temperature / top-p and seed.
  Greedy rows take the argmax of their logits; sampled rows draw from them with their own
  ``torch.Generator`` (seeded; the same seed gives the same text at any batch composition up to
  the float sums below).
- **A row leaves when it stops** (a stop token, its length, its caller closing the stream or
  cancelling): its KV cells are freed at once and a waiting request takes the slot.
- **A free slot admits the next request** (first come, first served); a request whose prompt plus max
  new tokens exceeds ``slot_ctx`` is refused up front (:meth:`fits` says so beforehand; ``LocalLM`` then
  runs it on the one-at-a-time context).

The rows of one step share every weight read, which is where batching pays on a CPU: a decoding
step for 4 rows costs far less than 4 steps of 1.

**Same answers at any batch composition.**  A greedy answer must not depend on who else is being
answered.  Measured on the embedded model (2 threads), three things broke that, and are avoided:
two prompts in one ubatch (their logits moved by up to 1.2), one cache shared by all rows
(``kv_unified``: the attention's length, and so its summation, depends on the other rows' cells) and
flash attention (its work split over threads depends on the batch's shape; prompts of 700-1,100
tokens diverged after 9-19 tokens).  With separate caches per slot, plain attention and prompts fed
one row at a time, every row's tokens equal its tokens alone (``tests/lm/test_batching.py``,
``tests/serve/test_serve_batching.py``); ``benchmarks/serve.py`` measures the gain.
"""

from __future__ import annotations

import collections
import queue
import threading
import time
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from tessera.errors import ContextTooLongError

_END = object()


@dataclass(eq=False)
class _Row:
    prompt: list[int]
    max_new: int
    temperature: float
    top_p: float
    stop_ids: frozenset
    generator: torch.Generator | None
    out: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    slot: int = -1
    fed: int = 0  # prompt tokens evaluated so far
    new: int = 0  # tokens sampled so far
    last: int | None = None  # the sampled token the next step feeds
    joined: float = 0.0

    @property
    def prefilling(self) -> bool:
        return self.fed < len(self.prompt)


@dataclass
class BatchStats:
    """What the loop did: steps, rows per step, prompt and new tokens, requests served and cancelled."""

    steps: int = 0
    row_steps: int = 0  # sum over steps of the rows that decoded a token
    peak_rows: int = 0  # most rows in the batch at once
    prompt_tokens: int = 0
    new_tokens: int = 0
    served: int = 0
    cancelled: int = 0
    busy_s: float = 0.0

    @property
    def mean_rows(self) -> float:
        return self.row_steps / self.steps if self.steps else 0.0

    def to_dict(self) -> dict:
        return {"steps": self.steps, "mean_decoding_rows": round(self.mean_rows, 3), "peak_rows": self.peak_rows,
                "prompt_tokens": self.prompt_tokens,
                "new_tokens": self.new_tokens, "served": self.served, "cancelled": self.cancelled,
                "busy_s": round(self.busy_s, 3)}


class ContinuousBatcher:
    """Continuous batching over a :class:`~tessera.lm.llamacpp.LlamaCppEngine`'s model (see the module docstring)."""

    def __init__(self, engine, max_batch: int = 4, slot_ctx: int | None = None, n_batch: int | None = None):
        import llama_cpp
        from llama_cpp._internals import LlamaBatch, LlamaContext

        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        src = engine.llm
        self.max_batch = int(max_batch)
        self.n_batch = int(n_batch or src.n_batch)
        params = llama_cpp.llama_context_default_params()
        self.slot_ctx = int(slot_ctx or min(src.n_ctx(), 4096))
        params.n_ctx = self.slot_ctx * self.max_batch
        params.n_batch = params.n_ubatch = self.n_batch
        params.n_seq_max = self.max_batch
        params.kv_unified = False  # a cache per slot: a row's attention never spans other rows' cells
        params.n_threads = params.n_threads_batch = int(engine.threads)
        params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        params.no_perf = True
        self._ctx = LlamaContext(model=src._model, params=params, verbose=False)
        self._batch = LlamaBatch(n_tokens=self.n_batch, embd=0, n_seq_max=1, verbose=False)
        self.n_vocab = int(engine.n_vocab)
        self.stats = BatchStats()
        self._waiting: collections.deque[_Row] = collections.deque()
        self._active: dict[int, _Row] = {}
        self._cond = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None
        self._engine = engine  # keeps the model alive as long as this context
        weakref.finalize(self, self._ctx.close)

    # ------------------------------------------------------------------ callers
    def fits(self, prompt_tokens: int, max_new_tokens: int) -> bool:
        """Whether a generation of this size fits one slot's cache."""
        return prompt_tokens + max_new_tokens <= self.slot_ctx

    def counts(self) -> tuple[int, int]:
        """``(rows in the batch, requests waiting for a slot)``."""
        with self._cond:
            return len(self._active), len(self._waiting)

    def stream(self, prompt: Sequence[int], max_new_tokens: int, stop_ids=(), temperature: float = 0.0,
               top_p: float = 1.0, seed: int = 0) -> Iterator[int]:
        """Token ids of one generation as the batch produces them (a stop token is yielded, then the stream
        ends).  Closing the iterator early (``break``, an exception in the caller) frees the row's slot at
        the next step."""
        prompt = [int(t) for t in prompt]
        if not prompt:
            raise ValueError("an empty prompt: give at least one token")
        row = _Row(prompt, int(max_new_tokens), float(temperature), float(top_p), frozenset(int(i) for i in stop_ids),
                   torch.Generator().manual_seed(int(seed)) if temperature > 0 else None)
        if not self.fits(len(prompt), max_new_tokens):
            raise ContextTooLongError(f"the prompt is {len(prompt)} tokens and {max_new_tokens} more are to be generated, "
                                      f"but a batch slot holds {self.slot_ctx}; shorten it or lower --max-new-tokens")
        if row.max_new <= 0:
            return
        with self._cond:
            if self._closed:
                raise RuntimeError("the batcher is closed")
            row.joined = time.monotonic()
            self._waiting.append(row)
            self._start()
            self._cond.notify_all()
        try:
            while True:
                item = row.out.get()
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            if not row.cancelled.is_set():
                row.cancelled.set()
                with self._cond:
                    self._cond.notify_all()

    def close(self, wait: float = 5.0) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(wait)

    # ------------------------------------------------------------------ the loop
    def _start(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._loop, name="tessera-batch", daemon=True)
            self._thread.start()

    def _finish(self, row: _Row, item=_END) -> None:
        """Take ``row`` out of the batch (caller holds the lock): free its cells and its slot, end its stream."""
        if row.slot >= 0:
            self._ctx.kv_cache_seq_rm(row.slot, -1, -1)
            self._active.pop(row.slot, None)
            row.slot = -1
        if row.cancelled.is_set():
            self.stats.cancelled += 1
        else:
            self.stats.served += item is _END
        row.out.put(item)

    def _admit(self) -> None:
        """Move waiting requests into free slots, first come first served (caller holds the lock)."""
        for row in [r for r in self._waiting if r.cancelled.is_set()]:
            self._waiting.remove(row)
            self.stats.cancelled += 1
            row.out.put(_END)
        while self._waiting and len(self._active) < self.max_batch:
            row = self._waiting.popleft()
            row.slot = next(s for s in range(self.max_batch) if s not in self._active)
            self._ctx.kv_cache_seq_rm(row.slot, -1, -1)
            self._active[row.slot] = row

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._closed and not self._waiting and not self._active:
                    self._cond.wait()
                if self._closed:
                    for row in list(self._active.values()) + list(self._waiting):
                        self._finish(row, RuntimeError("the server is shutting down"))
                    self._waiting.clear()
                    return
                for row in [r for r in self._active.values() if r.cancelled.is_set()]:
                    self._finish(row)
                self._admit()
                rows = list(self._active.values())
                self.stats.peak_rows = max(self.stats.peak_rows, len(rows))
            if not rows:
                continue
            t0 = time.perf_counter()
            try:
                self._step(rows)
            except Exception as e:  # noqa: BLE001 - handed to every row of the failed step
                with self._cond:
                    for row in rows:
                        self._finish(row, RuntimeError(f"llama.cpp failed a batched step: {e}"))
            self.stats.busy_s += time.perf_counter() - t0

    def _decode(self, entries: list[tuple[int, int, int, bool]]) -> None:
        """One ``llama_decode`` of ``(token, position, sequence, wants logits)`` entries."""
        batch = self._batch.batch
        for i, (token, pos, seq, logits) in enumerate(entries):
            batch.token[i] = token
            batch.pos[i] = pos
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = seq
            batch.logits[i] = logits
        batch.n_tokens = len(entries)
        self._ctx.decode(self._batch)

    def _step(self, rows: list[_Row]) -> None:
        """One step: a token for every decoding row (one ``llama_decode``), then the next prompt chunk of one
        joining row (a second one).

        Prompts are fed one row at a time: llama.cpp's logits for a prompt change (by up to about 1 in the
        logits of the embedded model) when another sequence's prompt shares its ubatch, while a row's logits are
        bit-identical whether it decodes alone, beside other decoding rows or beside one prompt (measured), so
        a greedy answer is the same text at any batch composition."""
        picked: list[tuple[_Row, int]] = []
        decoding = [r for r in rows if not r.prefilling]
        for start in range(0, len(decoding), self.n_batch):
            part = decoding[start:start + self.n_batch]
            self._decode([(r.last, len(r.prompt) + r.new - 1, r.slot, True) for r in part])
            picked += [(r, self._sample(i, r)) for i, r in enumerate(part)]
        self.stats.row_steps += len(decoding)
        joining = next((r for r in rows if r.prefilling), None)
        if joining is not None:
            chunk = joining.prompt[joining.fed: joining.fed + self.n_batch]
            last = len(joining.prompt) - 1
            self._decode([(t, joining.fed + j, joining.slot, joining.fed + j == last) for j, t in enumerate(chunk)])
            joining.fed += len(chunk)
            self.stats.prompt_tokens += len(chunk)
            if not joining.prefilling:
                picked.append((joining, self._sample(len(chunk) - 1, joining)))
        self.stats.steps += 1
        with self._cond:
            for row, token in picked:
                if row.cancelled.is_set():
                    self._finish(row)
                    continue
                row.new += 1
                row.last = token
                self.stats.new_tokens += 1
                row.out.put(token)
                if token in row.stop_ids or row.new >= row.max_new:
                    self._finish(row)

    def _sample(self, i: int, row: _Row) -> int:
        logits = np.ctypeslib.as_array(self._ctx.get_logits_ith(i), shape=(self.n_vocab,))
        if row.temperature <= 0:
            return int(np.argmax(logits))
        from tessera.lm.sampling import sample_next

        return int(sample_next(torch.from_numpy(logits.copy())[None], row.temperature, row.top_p, row.generator)[0])
