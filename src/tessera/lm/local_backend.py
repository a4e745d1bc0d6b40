"""The :class:`~tessera.lm.base.Backend` interface over a local transformers model (:class:`LocalLM`).

Conversations are encoded with the tokenizer's chat template, sorted by length
and generated ``batch_size`` at a time (:meth:`LocalLM.generate_batch`: tessera's engine, which
computes the prompts' shared prefix once, or ``model.generate`` with ``engine="hf"``), which
raises throughput on both CPU and GPU; results come back in input order.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from tessera.lm.base import Backend, Conversation, Generation
from tessera.lm.local import LocalLM


class LocalBackend(Backend):
    def __init__(self, lm: LocalLM, batch_size: int = 8, repetition_penalty: float = 1.0):
        super().__init__()
        self.lm = lm
        self.batch_size = max(1, int(batch_size))
        self.repetition_penalty = float(repetition_penalty)
        self.name = f"local:{lm.name}"
        self.engine: str | None = None  # None: the model's default (tessera.lm.engine for Llama-family models)

    @classmethod
    def load(cls, spec: str = "default", device=None, batch_size: int = 8, **kw) -> "LocalBackend":
        return cls(LocalLM.load(spec, device=device), batch_size=batch_size, **kw)

    @property
    def context_window(self) -> int:
        return self.lm.context_window

    def count_tokens(self, text: str) -> int:
        return self.lm.count_tokens(text)

    def encode(self, conversation: Conversation, prefix: str = "") -> list[int]:
        ids = self.lm.encode_chat(conversation)[0].tolist()
        if prefix:
            ids += self.lm.tokenizer(prefix, add_special_tokens=False)["input_ids"]
        return ids

    def _batches(self, prompts: list[list[int]], batch_size: int):
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))  # similar lengths share a batch
        for s in range(0, len(order), batch_size):
            yield order[s:s + batch_size]

    def chat(self, conversations: Sequence[Conversation], *, max_new_tokens: int = 256, temperature: float = 0.0,
             top_p: float = 1.0, seed: int = 0, prefix: str = "", stop_when: Callable[[str], bool] | None = None,
             batch_size: int | None = None) -> list[Generation]:
        prompts = [self.encode(c, prefix) for c in conversations]
        out: list[Generation | None] = [None] * len(prompts)
        tok = self.lm.tokenizer
        wrapped = (lambda text: stop_when(prefix + text)) if stop_when is not None else None
        for b, idx in enumerate(self._batches(prompts, batch_size or self.batch_size)):
            t0 = time.perf_counter()
            try:
                rows = self.lm.generate_batch([prompts[i] for i in idx], max_new_tokens=max_new_tokens,
                                              temperature=temperature, top_p=top_p, seed=seed + b, stop_when=wrapped,
                                              repetition_penalty=self.repetition_penalty, engine=self.engine)
            except Exception as e:  # recorded, never raised: long jobs go on
                if type(e).__name__ == "ContextTooLongError":
                    msg = str(e)
                else:
                    msg = f"{type(e).__name__}: {str(e)[:200]}"
                for i in idx:
                    out[i] = Generation("", len(prompts[i]), 0, "error", msg)
                self.stats.add(failures=len(idx), calls=1, conversations=len(idx))
                continue
            dt = time.perf_counter() - t0
            for i, r in zip(idx, rows):
                out[i] = Generation(prefix + tok.decode(r.token_ids, skip_special_tokens=True), len(prompts[i]),
                                    len(r.token_ids), "length" if r.stop_reason == "length" else "stop", None, dt)
            self.stats.add(calls=1, conversations=len(idx), prompt_tokens=sum(len(prompts[i]) for i in idx),
                           new_tokens=sum(len(r.token_ids) for r in rows), seconds=dt)
        return out  # type: ignore[return-value]

    def candidate_token_ids(self, candidates: Sequence[str]) -> dict[str, list[int]]:
        """Each candidate's first token, written bare and after a space (``"Yes"``, ``" Yes"``)."""
        tok = self.lm.tokenizer
        out = {}
        for c in candidates:
            ids = set()
            for variant in (c, " " + c):
                t = tok(variant, add_special_tokens=False)["input_ids"]
                if t:
                    ids.add(t[0])
            out[c] = sorted(ids)
        return out

    def next_token_logprobs(self, conversations: Sequence[Conversation], candidates: Sequence[str],
                            prefix: str = "", batch_size: int | None = None) -> list[dict[str, float]]:
        prompts = [self.encode(c, prefix) for c in conversations]
        cand = self.candidate_token_ids(candidates)
        out: list[dict[str, float] | None] = [None] * len(prompts)
        for idx in self._batches(prompts, batch_size or self.batch_size):
            t0 = time.perf_counter()
            logp = self.lm.batched_last_logprobs([prompts[i] for i in idx], engine=self.engine)
            for row, i in enumerate(idx):
                out[i] = {c: float(logp[row, ids].logsumexp(0)) for c, ids in cand.items()}
            self.stats.add(calls=1, conversations=len(idx), prompt_tokens=sum(len(prompts[i]) for i in idx),
                           seconds=time.perf_counter() - t0)
        return out  # type: ignore[return-value]
