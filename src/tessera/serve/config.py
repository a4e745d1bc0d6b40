"""The server's own configuration: the only place models and corpus paths come from."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from tessera.errors import InputError


MULTIPART_MAX_FILES = 1000  # Starlette's form parser (FastAPI's File(...)) reads at most this many files


@dataclass
class ServeConfig:
    """Settings of ``tessera serve`` (requests can choose none of the models or paths here).

    - ``host``/``port``: bind address; 127.0.0.1 unless told otherwise.
    - ``lm``: the one language model (a spec for :func:`tessera.hub.load_lm`).
    - ``corpora``: corpora served from the start (``python-docs`` or paths), by id.
    - ``encoder``: sentence-transformers spec for ``dense``/``hybrid`` retrieval;
      ``None`` serves BM25 only.  ``prebuild_dense`` builds the dense indexes of the
      configured corpora (and uploads) as background jobs at start.
    - ``max_batch``: requests answered at once; their generations decode together on the llama.cpp
      engine (continuous batching) or go together to ``lm_url``.  1 answers one at a time (also what
      other local engines do).
    - ``queue_size``: requests that may wait behind the running ones; more get 429.
    - ``request_timeout_s``: queue wait plus generation; past it a request ends with 504.
    - ``max_new_tokens``: default and ``max_new_tokens_limit`` cap of an answer's length.
    - ``max_k``: most passages a request may retrieve; ``max_question_chars``.
    - uploads: ``max_upload_bytes`` per request, ``max_upload_files`` per request,
      ``max_uploaded_corpora`` kept at once, stored under ``upload_dir``
      (default ``$TESSERA_HOME/serve/corpora``).
    """

    host: str = "127.0.0.1"
    port: int = 8000
    lm: str = "default"
    engine: str = "auto"  # LocalLM.load: auto | llamacpp | tessera | hf
    lm_url: str | None = None  # an OpenAI-compatible server that serves `lm` (answers stream from it)
    lm_model: str | None = None  # the model's name on that server, when it differs from `lm`
    corpora: list[str] = field(default_factory=lambda: ["python-docs"])
    encoder: str | None = "default-encoder"
    prebuild_dense: bool = True
    max_batch: int = 4
    queue_size: int = 8
    request_timeout_s: float = 180.0
    max_new_tokens: int = 128
    max_new_tokens_limit: int = 512
    max_k: int = 10
    max_question_chars: int = 2000
    max_upload_bytes: int = 10 * 1024 * 1024
    max_upload_files: int = 20
    max_uploaded_corpora: int = 16
    upload_dir: str | None = None
    body_timeout_s: float = 30.0  # a request body that sends nothing for this long gets 408 (slow clients)
    seed: int = 0

    def __post_init__(self):
        if self.engine not in ("auto", "llamacpp", "tessera", "hf"):
            raise InputError(f"unknown --engine {self.engine!r}: use auto, llamacpp, tessera or hf")
        if not self.corpora:
            raise InputError("the server needs at least one corpus; pass --corpus python-docs or a path")
        for name in ("queue_size", "max_k", "max_upload_files", "max_uploaded_corpora"):
            if getattr(self, name) < 0:
                raise InputError(f"{name} must be 0 or more, got {getattr(self, name)}")
        for name in ("max_batch", "max_new_tokens", "max_new_tokens_limit", "max_question_chars", "max_upload_bytes"):
            if getattr(self, name) < 1:
                raise InputError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_upload_files > MULTIPART_MAX_FILES:
            raise InputError(f"--max-upload-files must be at most {MULTIPART_MAX_FILES} (the multipart parser reads no more "
                             f"files per request), got {self.max_upload_files}")
        if self.body_timeout_s <= 0:
            raise InputError(f"--body-timeout must be positive, got {self.body_timeout_s}")
        if self.request_timeout_s <= 0:
            raise InputError(f"request_timeout_s must be positive, got {self.request_timeout_s}")
        if not 0 <= self.port <= 65535:
            raise InputError(f"--port must be 0..65535, got {self.port}")
        self.max_new_tokens = min(self.max_new_tokens, self.max_new_tokens_limit)

    def uploads_path(self) -> Path:
        from tessera.hub import tessera_home

        return Path(self.upload_dir).expanduser() if self.upload_dir else tessera_home() / "serve" / "corpora"
