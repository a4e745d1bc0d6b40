"""The :class:`~tessera.lm.base.Backend` interface over any OpenAI-compatible server (vLLM, llama.cpp server, ...).

Large-scale generation (DESIGN.md) goes through a server rather than our own code:
``vllm serve MODEL`` or ``llama-server -m MODEL.gguf`` expose ``/v1/chat/completions``,
and this backend talks to it with the official ``openai`` client:

- **concurrency**: up to ``concurrency`` requests in flight (a thread pool), so the
  server's continuous batching sees many sequences at once;
- **timeouts**: ``timeout`` seconds per request (the client's own timeout);
- **retries**: timeouts, connection errors, HTTP 408/409/429 and 5xx are retried up
  to ``max_retries`` times with exponential backoff (``backoff * 2**attempt``
  seconds); other errors (a 400 for a bad request, a 404 for an unknown model) are
  not retried.  A request that still fails comes back as a :class:`Generation`
  with ``error`` set: the run records it and goes on.
- ``prefix`` (a forced start of the reply) uses vLLM's ``continue_final_message``
  extension (``prefix_mode="vllm"``, the default); with ``prefix_mode="none"`` the
  prefix is not sent and the reply is returned as the server wrote it.
- :meth:`next_token_logprobs` asks for one token with ``top_logprobs=20`` (the API's
  maximum); candidates outside the top 20 get ``-inf``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

from tessera.errors import InputError
from tessera.lm.base import Backend, Conversation, Generation

RETRY_STATUS = (408, 409, 429)


def _retryable(err: Exception) -> bool:
    import openai

    if isinstance(err, (openai.APITimeoutError, openai.APIConnectionError)):
        return True
    status = getattr(err, "status_code", None)
    return isinstance(status, int) and (status in RETRY_STATUS or status >= 500)


def _describe(err: Exception) -> str:
    status = getattr(err, "status_code", None)
    msg = " ".join(str(err).split())[:200]
    return f"{type(err).__name__}{f' (HTTP {status})' if status else ''}: {msg}"


class OpenAIBackend(Backend):
    def __init__(self, base_url: str, model: str = "default", api_key: str | None = None, concurrency: int = 8,
                 timeout: float = 120.0, max_retries: int = 3, backoff: float = 0.5, prefix_mode: str = "vllm",
                 context_window: int = 8192):
        super().__init__()
        try:
            import openai
        except ImportError:
            raise InputError("the OpenAI-compatible backend needs the openai package; run `pip install openai`") from None
        if not base_url.startswith(("http://", "https://")):
            raise InputError(f"--lm-url {base_url!r} is not an http(s) URL; pass e.g. http://127.0.0.1:8000/v1")
        if prefix_mode not in ("vllm", "none"):
            raise InputError(f"prefix_mode must be 'vllm' or 'none', got {prefix_mode!r}")
        if concurrency < 1 or max_retries < 0 or timeout <= 0:
            raise InputError("concurrency must be >= 1, max_retries >= 0 and timeout > 0")
        self.client = openai.OpenAI(base_url=base_url, api_key=api_key or "EMPTY", timeout=timeout, max_retries=0)
        self.model, self.concurrency, self.max_retries, self.backoff = model, int(concurrency), int(max_retries), float(backoff)
        self.prefix_mode = prefix_mode
        self._context_window = int(context_window)
        self.name = f"openai:{model}@{base_url}"

    @property
    def context_window(self) -> int:
        return self._context_window

    def _request(self, kwargs: dict):
        """One chat completion with retries; returns ``(response, None)`` or ``(None, error message)``."""
        err = None
        for attempt in range(self.max_retries + 1):
            if attempt:
                self.stats.add(retries=1)
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                return self.client.chat.completions.create(**kwargs), None
            except Exception as e:  # noqa: BLE001 - recorded, never raised
                err = e
                if not _retryable(e):
                    break
        return None, _describe(err)

    def _messages(self, conversation: Conversation, prefix: str) -> tuple[list[dict], dict]:
        msgs = [dict(m) for m in conversation]
        if prefix and self.prefix_mode == "vllm":
            return msgs + [{"role": "assistant", "content": prefix}], {"continue_final_message": True, "add_generation_prompt": False}
        return msgs, {}

    def _one_chat(self, conversation: Conversation, max_new_tokens: int, temperature: float, top_p: float, seed: int,
                  prefix: str) -> Generation:
        msgs, extra = self._messages(conversation, prefix)
        kwargs = dict(model=self.model, messages=msgs, max_tokens=int(max_new_tokens), temperature=float(temperature),
                      top_p=float(top_p), seed=int(seed))
        if extra:
            kwargs["extra_body"] = extra
        t0 = time.perf_counter()
        resp, err = self._request(kwargs)
        dt = time.perf_counter() - t0
        if resp is None:
            self.stats.add(failures=1, conversations=1, calls=1)
            return Generation("", 0, 0, "error", err, dt)
        try:
            choice = resp.choices[0]
            text = choice.message.content or ""
        except (AttributeError, IndexError, TypeError):
            self.stats.add(failures=1, conversations=1, calls=1)
            return Generation("", 0, 0, "error", "malformed response (no choices[0].message)", dt)
        usage = getattr(resp, "usage", None)
        p_tok = int(getattr(usage, "prompt_tokens", 0) or 0)
        n_tok = int(getattr(usage, "completion_tokens", 0) or 0) or self.count_tokens(text)
        if prefix and self.prefix_mode == "vllm" and not text.startswith(prefix):
            text = prefix + text
        finish = "length" if getattr(choice, "finish_reason", "") == "length" else "stop"
        self.stats.add(calls=1, conversations=1, prompt_tokens=p_tok, new_tokens=n_tok)
        return Generation(text, p_tok, n_tok, finish, None, dt)

    def _map(self, fn, items):
        t0 = time.perf_counter()
        with ThreadPoolExecutor(max_workers=min(self.concurrency, max(1, len(items)))) as pool:
            out = list(pool.map(fn, items))
        self.stats.add(seconds=time.perf_counter() - t0)
        return out

    def chat(self, conversations: Sequence[Conversation], *, max_new_tokens: int = 256, temperature: float = 0.0,
             top_p: float = 1.0, seed: int = 0, prefix: str = "",
             stop_when: Callable[[str], bool] | None = None) -> list[Generation]:
        return self._map(lambda ic: self._one_chat(ic[1], max_new_tokens, temperature, top_p, seed + ic[0], prefix),
                         list(enumerate(conversations)))

    def _one_logprobs(self, conversation: Conversation, candidates: Sequence[str], prefix: str) -> dict[str, float]:
        msgs, extra = self._messages(conversation, prefix)
        kwargs = dict(model=self.model, messages=msgs, max_tokens=1, temperature=0.0, logprobs=True, top_logprobs=20)
        if extra:
            kwargs["extra_body"] = extra
        resp, err = self._request(kwargs)
        scores = dict.fromkeys(candidates, -math.inf)
        try:
            top = resp.choices[0].logprobs.content[0].top_logprobs if resp is not None else []
        except (AttributeError, IndexError, TypeError):
            top = []
        if resp is None or not top:
            self.stats.add(failures=1, calls=1, conversations=1)
            return scores
        for c in candidates:
            lps = [t.logprob for t in top if t.token.strip() == c]
            if lps:
                m = max(lps)
                scores[c] = m + math.log(sum(math.exp(x - m) for x in lps))
        self.stats.add(calls=1, conversations=1)
        return scores

    def next_token_logprobs(self, conversations: Sequence[Conversation], candidates: Sequence[str],
                            prefix: str = "") -> list[dict[str, float]]:
        return self._map(lambda c: self._one_logprobs(c, candidates, prefix), list(conversations))

    def stream_completion(self, prompt: str, *, max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0,
                          seed: int = 0) -> Iterator[tuple[str, str | None]]:
        """``(text piece, finish_reason or None)`` as the server streams a raw completion of ``prompt`` (the
        chat template already applied, special tokens written out: vLLM and llama.cpp parse them).  The
        connection is retried like :meth:`chat` until the first piece arrives; a server that cannot be
        reached raises :class:`~tessera.errors.InputError` with what to check."""
        # llama.cpp's server applies a 1.1 repeat penalty unless told otherwise; tessera's engines apply none (vLLM
        # ignores the field)
        kwargs = dict(model=self.model, prompt=prompt, max_tokens=int(max_new_tokens), temperature=float(temperature),
                      top_p=float(top_p), seed=int(seed), stream=True, extra_body={"repeat_penalty": 1.0})
        stream, err = None, None
        for attempt in range(self.max_retries + 1):
            if attempt:
                self.stats.add(retries=1)
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                stream = self.client.completions.create(**kwargs)
                break
            except Exception as e:  # noqa: BLE001 - turned into one line below
                err = e
                if not _retryable(e):
                    break
        if stream is None:
            raise InputError(f"the LM server at {self.client.base_url} failed: {_describe(err)}; check --lm-url and "
                             "that it serves the model named by --lm")
        t0 = time.perf_counter()
        for chunk in stream:
            choices = getattr(chunk, "choices", None) or []
            if choices:
                yield choices[0].text or "", choices[0].finish_reason
        self.stats.add(calls=1, conversations=1, seconds=time.perf_counter() - t0)
