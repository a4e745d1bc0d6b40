"""Generation backends: local transformers models (``LocalLM``)."""

from tessera.lm.local import GenerationStats, LocalLM

__all__ = ["GenerationStats", "LocalLM"]
