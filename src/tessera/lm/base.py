"""One interface for text generation backends (local transformers models, OpenAI-compatible servers).

A :class:`Backend` takes *conversations* (lists of chat messages ``{"role", "content"}``)
and returns one :class:`Generation` per conversation, in input order.  Backends batch
(local) or fan out requests concurrently (HTTP) on their own, so callers hand them
whole lists.  Failures never raise out of :meth:`Backend.chat`: a conversation that
could not be answered comes back with ``error`` set and ``finish_reason="error"``,
so long jobs record it and go on.

Two operations cover what tessera's LLM-driven methods need:

- :meth:`Backend.chat`: generated text (ReasonIR's data synthesis, query rewriting);
- :meth:`Backend.next_token_logprobs`: the log-probabilities of a few candidate
  continuations right after the generation prompt (pointwise reranking by
  P("Yes"), multiple-choice answering by the option letter's likelihood).

``prefix`` starts the assistant's reply with fixed text (e.g. ``{"query": "``) and
the model continues it; the returned text includes the prefix.  It steers small
models into a format far more reliably than instructions alone.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

Conversation = list[dict]


@dataclass
class Generation:
    """One generated reply (``text`` includes ``prefix`` when one was given)."""

    text: str
    prompt_tokens: int = 0
    new_tokens: int = 0
    finish_reason: str = ""  # "stop" | "length" | "error"
    error: str | None = None
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class BackendStats:
    """Running totals over a backend's lifetime (thread-safe updates)."""

    calls: int = 0
    conversations: int = 0
    prompt_tokens: int = 0
    new_tokens: int = 0
    failures: int = 0
    retries: int = 0
    seconds: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, **kw) -> None:
        with self._lock:
            for k, v in kw.items():
                setattr(self, k, getattr(self, k) + v)

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict:
        return {"calls": self.calls, "conversations": self.conversations, "prompt_tokens": self.prompt_tokens,
                "new_tokens": self.new_tokens, "failures": self.failures, "retries": self.retries,
                "seconds": round(self.seconds, 3), "tokens_per_s": round(self.tokens_per_s, 3)}


class Backend(ABC):
    """Text generation for many conversations at once; see the module docstring."""

    name: str = ""

    def __init__(self) -> None:
        self.stats = BackendStats()

    @property
    def context_window(self) -> int:
        return 4096

    @abstractmethod
    def chat(self, conversations: Sequence[Conversation], *, max_new_tokens: int = 256, temperature: float = 0.0,
             top_p: float = 1.0, seed: int = 0, prefix: str = "",
             stop_when: Callable[[str], bool] | None = None) -> list[Generation]:
        """One reply per conversation.  ``stop_when(text)`` may end a reply early (local backends check it while
        decoding; remote ones cannot and ignore it)."""

    @abstractmethod
    def next_token_logprobs(self, conversations: Sequence[Conversation], candidates: Sequence[str],
                            prefix: str = "") -> list[dict[str, float]]:
        """``[{candidate: log p(candidate's first token | prompt + prefix)}]`` per conversation.

        A candidate the backend cannot score (a server that only returns its top
        log-probabilities) gets ``-inf``.
        """

    def count_tokens(self, text: str) -> int:
        """Tokens in ``text`` (remote backends estimate: 4 characters per token)."""
        return max(1, len(text) // 4)
