"""Shared fixtures: an isolated $TESSERA_HOME, tiny random-weight models, the embedded defaults."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ["TESSERA_QUIET"] = "1"


@pytest.fixture(scope="session", autouse=True)
def tessera_home(tmp_path_factory):
    """Every test session converts and caches into its own folder: no state leaks in or out."""
    home = tmp_path_factory.mktemp("tessera_home")
    old = os.environ.get("TESSERA_HOME")
    os.environ["TESSERA_HOME"] = str(home)
    yield home
    if old is None:
        os.environ.pop("TESSERA_HOME", None)
    else:
        os.environ["TESSERA_HOME"] = old


@pytest.fixture(scope="session")
def embedded_lm_dir(tessera_home) -> Path:
    """The embedded SmolLM2 converted once per session (about 20-30 s)."""
    from tessera import hub

    return hub.embedded_lm_dir()


@pytest.fixture(scope="session")
def embedded_lm(embedded_lm_dir):
    from tessera.lm import LocalLM

    return LocalLM.load("default", device="cpu", engine="tessera")  # the transformers model (llama.cpp: test_llamacpp)


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory, embedded_lm_dir) -> Path:
    """A 2-layer random-weight Llama with SmolLM2's tokenizer and chat template, saved as a HF folder."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(embedded_lm_dir)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg)
    out = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_lm(tiny_lm_dir):
    from tessera.lm import LocalLM

    return LocalLM.load(str(tiny_lm_dir), device="cpu")
