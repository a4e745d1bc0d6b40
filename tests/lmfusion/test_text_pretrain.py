"""``tessera.recipes.text_pretrain``: a from-scratch text Llama trained on a corpus until its held-out loss
plateaus, saved as a Hugging Face folder that LMFusion (and ``tessera.hub``) load unchanged; reused by config."""

from __future__ import annotations

import json

import torch

from tessera.recipes.text_pretrain import REPORT, TextPretrainConfig, pretrain_text_llama


def _cfg(**kw):
    base = dict(hidden_size=32, layers=1, heads=2, kv_heads=1, vocab_size=400, seq_len=32, batch_size=4, steps=6,
                eval_every=2, eval_blocks=4, sources=("docs:python-docs",))
    return TextPretrainConfig(**{**base, **kw})


def test_pretrain_saves_a_loadable_llama_and_reuses_it(tmp_path):
    from tessera.models.lmfusion import LMFusionModel, load_base
    from tessera.models.lmfusion_modules import LMFusionConfig

    out = tmp_path / "textlm"
    rep = pretrain_text_llama(_cfg(), out, threads=1)
    assert json.loads((out / REPORT).read_text()) == rep
    assert [r["step"] for r in rep["curve"]] == [0, 2, 4, 6]
    assert rep["curve"][-1]["val_loss"] < rep["curve"][0]["val_loss"]  # it learns
    assert rep["final_val_loss"] == rep["curve"][-1]["val_loss"] and rep["heldout_perplexity"] > 1
    assert rep["train_tokens"] == 6 * 4 * 32 and rep["train_flops"] > 0 and isinstance(rep["plateau"], float)
    base, tok = load_base(str(out), device="cpu", dtype=torch.float32)
    assert base.config.model_type == "llama" and len(tok) == 400 and base.config.hidden_size == 32
    fused = LMFusionModel(base, LMFusionConfig(base_model=str(out)))
    ids = torch.tensor([tok("def f(x): return x", add_special_tokens=False).input_ids])
    with torch.no_grad():
        assert torch.equal(fused.logits(ids), base(ids).logits)
    # same config: reused as is; another config: trained again in place
    mtime = (out / "model.safetensors").stat().st_mtime_ns
    assert pretrain_text_llama(_cfg(), out) == rep and (out / "model.safetensors").stat().st_mtime_ns == mtime
    rep2 = pretrain_text_llama(_cfg(steps=4), out, threads=1)
    assert rep2["config"]["steps"] == 4 and [r["step"] for r in rep2["curve"]] == [0, 2, 4]
    assert not list(tmp_path.glob(".textlm.*"))  # no temporary folder left behind
