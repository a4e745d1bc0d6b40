"""Tiny random-weight Llama experts for the BTX tests (no tokenizer, no downloads)."""

from __future__ import annotations

from pathlib import Path

import torch


def tiny_llama_config(**kw):
    from transformers import LlamaConfig

    base = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
                pad_token_id=0)
    base.update(kw)
    return LlamaConfig(**base)


def make_experts(root: Path, n: int = 3, identical: bool = False, **kw) -> list[Path]:
    """``n`` saved Llama folders with the same shapes: random weights (different seeds), or one copied ``n`` times."""
    from transformers import LlamaForCausalLM

    paths = []
    for i in range(n):
        torch.manual_seed(0 if identical else i + 1)
        m = LlamaForCausalLM(tiny_llama_config(**kw))
        p = root / f"expert{i}"
        m.save_pretrained(p)
        paths.append(p)
    return paths
