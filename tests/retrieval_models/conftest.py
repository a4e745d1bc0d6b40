"""Fixtures for the retriever tests: a deeper tiny Llama for pruning, the synthetic task."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_llama8_dir(tmp_path_factory, tiny_lm_dir):
    """An 8-layer random Llama (hidden 64, 8 heads in 4 GQA groups, FFN 256) with SmolLM2's tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tiny_lm_dir)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=256, num_hidden_layers=8,
                      num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      tie_word_embeddings=True)
    out = tmp_path_factory.mktemp("tiny_llama8")
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def synthetic():
    from retrieval_synthetic import synthetic_task

    return synthetic_task()
