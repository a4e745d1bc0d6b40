"""Generation backends: local transformers models (``LocalLM``, ``LocalBackend``) and any
OpenAI-compatible HTTP server (``OpenAIBackend``), behind one interface (``Backend``)."""

from tessera.lm.backends import load_backend
from tessera.lm.base import Backend, BackendStats, Generation
from tessera.lm.local import GenerationStats, LocalLM

__all__ = ["Backend", "BackendStats", "Generation", "GenerationStats", "LocalLM", "load_backend"]
