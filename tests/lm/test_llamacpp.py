"""The llama.cpp engine (tessera.lm.llamacpp) behind LocalLM, on the embedded GGUF; engine selection."""

from __future__ import annotations

import pytest
import torch

from tessera import hub
from tessera.errors import InputError, ModelNotFoundError
from tessera.lm import llamacpp
from tessera.lm.local import GenerationStats, LocalLM, engine_choice

needs_llamacpp = pytest.mark.skipif(not llamacpp.available(),
                                    reason="llama-cpp-python is not installed (make install builds it; optional)")

PROMPTS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Write one sentence about the sea."}],
    [{"role": "user", "content": "List three prime numbers."}],
    [{"role": "user", "content": "What is the capital of Spain?"}],
]


@pytest.fixture(scope="module")
def llama_lm(embedded_lm_dir):
    if not llamacpp.available():
        pytest.skip("llama-cpp-python is not installed")
    return LocalLM.load("default", engine="llamacpp")


def _ids(lm, messages):
    return lm.encode_chat(messages)[0].tolist()


# ---------------------------------------------------------------- selection (no llama.cpp needed)
def test_engine_choice_rules(monkeypatch, embedded_lm_dir, tiny_lm_dir):
    monkeypatch.delenv("TESSERA_ENGINE", raising=False)
    monkeypatch.setattr(llamacpp, "available", lambda: False)
    eng, why = engine_choice("default")
    assert eng == "tessera" and "not installed" in why
    with pytest.raises(InputError, match="llama-cpp-python"):
        engine_choice("default", "llamacpp")
    monkeypatch.setattr(llamacpp, "available", lambda: True)
    assert engine_choice("default")[0] == "llamacpp"
    assert engine_choice(str(tiny_lm_dir))[0] == "tessera"  # a transformers folder: not GGUF
    with pytest.raises(InputError, match="GGUF"):
        engine_choice(str(tiny_lm_dir), "llamacpp")
    with pytest.raises(InputError, match="unknown engine"):
        engine_choice("default", "vllm")
    monkeypatch.setenv("TESSERA_ENGINE", "hf")
    assert engine_choice("default") == ("hf", "asked for")


def test_gguf_spec_errors(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no GGUF file"):
        hub.gguf_file(f"gguf:{tmp_path / 'missing.gguf'}")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file")
    with pytest.raises(ModelNotFoundError, match="not a GGUF file"):
        hub.gguf_file(f"gguf:{bad}")
    with pytest.raises(ModelNotFoundError, match="gguf:"):
        hub.resolve_lm(str(bad))  # a bare .gguf path: told to write gguf:PATH
    assert hub.gguf_file(str(tmp_path)) is None


def test_gguf_spec_loads_with_transformers(embedded_lm_dir):
    """``gguf:PATH`` on the tessera engine: the embedded file dequantizes to the same cached folder."""
    path = hub.embedded_lm_gguf()
    assert hub.resolve_lm(f"gguf:{path}") == str(embedded_lm_dir)


# ---------------------------------------------------------------- the engine itself
@needs_llamacpp
def test_stream_greedy_and_stats(llama_lm):
    assert llama_lm.engine == "llamacpp" and llama_lm._model is None
    stats = GenerationStats()
    ids = llama_lm.encode_chat(PROMPTS[0])
    text = "".join(llama_lm.stream(ids, max_new_tokens=24, stats=stats))
    assert len(text.split()) >= 3
    assert stats.prompt_tokens == ids.shape[1] and 0 < stats.new_tokens <= 24 and stats.stop_reason in ("eos", "length")
    # the same prompt again (its KV cache reused) gives the same greedy text
    assert "".join(llama_lm.stream(ids, max_new_tokens=24)) == text
    assert llama_lm._model is None  # text only: the transformers model was never loaded


@needs_llamacpp
def test_generate_batch_matches_one_at_a_time(llama_lm):
    prompts = [_ids(llama_lm, m) for m in PROMPTS]
    batch = llama_lm.generate_batch(prompts, max_new_tokens=16)
    for p, row in zip(prompts, batch):
        llama_lm._llama.llm.reset()  # no cached prefix
        single = llama_lm.generate_batch([p], max_new_tokens=16)[0]
        assert row.token_ids == single.token_ids and row.stop_reason == single.stop_reason
    assert all(len(llama_lm.tokenizer.decode(r.token_ids).split()) >= 2 for r in batch)


@needs_llamacpp
def test_stop_when_and_sampling(llama_lm):
    p = _ids(llama_lm, PROMPTS[1])
    out = llama_lm.generate_batch([p], max_new_tokens=40, stop_when=lambda text: len(text.split()) >= 3, stop_check_every=1)[0]
    assert out.stop_reason == "stop_when" and len(llama_lm.tokenizer.decode(out.token_ids).split()) >= 3
    a = llama_lm.generate_batch([p, p], max_new_tokens=20, temperature=1.0, seed=3)
    b = llama_lm.generate_batch([p, p], max_new_tokens=20, temperature=1.0, seed=3)
    assert [r.token_ids for r in a] == [r.token_ids for r in b]  # seeded
    assert a[0].token_ids != a[1].token_ids  # rows draw with their own seeds


@needs_llamacpp
def test_logprobs_agree_with_transformers(llama_lm, embedded_lm):
    """Q4_1 weights dequantized (transformers) and run as they are (llama.cpp): the same distributions up to
    quantization noise (llama.cpp multiplies int8-quantized activations; near-ties may swap)."""
    prompts = [_ids(llama_lm, m) for m in PROMPTS]
    a = llama_lm.batched_last_logprobs(prompts)
    b = embedded_lm.batched_last_logprobs(prompts)
    assert a.shape == b.shape and torch.allclose(a.exp().sum(-1), torch.ones(len(prompts)), atol=1e-3)
    top = b.topk(5, dim=-1).indices
    assert (a.argmax(-1)[:, None] == top[:, :3]).any(-1).all()
    gap = (a.gather(-1, top) - b.gather(-1, top)).abs()
    assert gap.max() < 0.5 and gap.mean() < 0.15  # measured: at most 0.34, mean 0.11 (llama.cpp's int8 activations)


@needs_llamacpp
def test_score_reuses_prefixes_without_changing_results(llama_lm):
    base = _ids(llama_lm, PROMPTS[0])
    answer = llama_lm.tokenizer("The capital of France is Paris.", add_special_tokens=False)["input_ids"]
    rows = [(base + answer, len(answer)), (base[:-3] + answer, len(answer)), (base + answer[:4], 4)]
    scored = llama_lm.score(rows)
    assert llama_lm.last_score_stats["computed_tokens"] < sum(len(r) - 1 for r, _ in rows)
    for (seq, n), got in zip(rows, scored):
        llama_lm._llama.llm.reset()
        alone = llama_lm.score([(seq, n)])[0]
        assert len(got) == n and max(abs(x - y) for x, y in zip(got, alone)) < 0.05
    # the last token's score is the next-token log-probability after the rest
    seq, n = rows[0]
    last = llama_lm.batched_last_logprobs([seq[:-1]])[0, seq[-1]]
    assert abs(float(last) - scored[0][-1]) < 0.05
    with pytest.raises(ValueError, match="cannot score"):
        llama_lm.score([(seq, len(seq))])


@needs_llamacpp
def test_model_loads_lazily_for_internals(llama_lm):
    lm = LocalLM.load("default", engine="llamacpp")
    assert lm._model is None and lm.device.type == "cpu"
    assert lm.model.config.model_type == "llama"  # loaded on first use (NEST, SelfCite internals)
    assert lm.engine == "llamacpp"
