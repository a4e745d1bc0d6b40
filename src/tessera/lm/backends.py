"""Pick a :class:`~tessera.lm.base.Backend`: an OpenAI-compatible server when a URL is given, else a local model.

The factory lives apart from the interface so that ``base`` imports neither backend (each backend
imports ``base``).
"""

from __future__ import annotations

from tessera.lm.base import Backend


def load_backend(spec: str = "default", url: str | None = None, *, api_key: str | None = None, concurrency: int = 8,
                 timeout: float = 120.0, max_retries: int = 3, batch_size: int = 8, device=None,
                 repetition_penalty: float = 1.0) -> Backend:
    """``url`` given: an OpenAI-compatible server (vLLM, llama.cpp server) serving model ``spec``;
    otherwise a local transformers model (``default`` = the embedded SmolLM2-135M-Instruct, a folder or a cached hub id).
    ``repetition_penalty`` (local only; transformers' CTRL-style penalty) keeps small models out of loops."""
    if url:
        from tessera.lm.openai_backend import OpenAIBackend

        return OpenAIBackend(base_url=url, model=spec, api_key=api_key, concurrency=concurrency, timeout=timeout,
                             max_retries=max_retries)
    from tessera.lm.local_backend import LocalBackend

    return LocalBackend.load(spec, device=device, batch_size=batch_size, repetition_penalty=repetition_penalty)
