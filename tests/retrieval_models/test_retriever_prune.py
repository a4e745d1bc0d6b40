"""DRAMA pruning: the plan hits the target, the checkpoint loads and runs, surgery is exact."""

from __future__ import annotations

import json

import pytest
import torch

from tessera.errors import InputError
from tessera.retrieval import prune as P


def smollm2_shape():
    from transformers import LlamaConfig

    # SmolLM2-135M's shape (no weights needed for planning)
    return LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                       num_attention_heads=9, num_key_value_heads=3, head_dim=64)


@pytest.mark.parametrize("ratio", [0.8, 0.5, 0.2, 0.1])
@pytest.mark.parametrize("depth_share", [0.0, 0.5, 1.0])
def test_plan_hits_the_target(ratio, depth_share):
    cfg = smollm2_shape()
    full = P.config_non_embedding_params(cfg)
    assert full == 30 * 3_540_096 + 576  # per layer: attention 884,736 + FFN 2,654,208 + norms 1,152
    plan = P.plan_architecture(cfg, int(full * ratio), depth_share=depth_share)
    assert abs(plan.rel_error) < 0.02
    assert cfg.hidden_size % plan.num_attention_heads == 0 and plan.num_attention_heads == 3 * plan.num_key_value_heads


def test_prune_tiny_llama_to_a_fifth(tiny_llama8_dir, tmp_path):
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    model, tok, report = P.prune(str(tiny_llama8_dir), target_ratio=0.2, calibration="python-docs", n_samples=4,
                                 seq_len=64, eval_samples=2)
    target = report.target
    out = P.save_pruned(model, tok, tmp_path / "pruned", report)
    loaded = AutoModel.from_pretrained(out)
    n = P.non_embedding_params(loaded)
    assert abs(n - target) / target < 0.05
    assert report.params_before["non_embedding"] == 492_608 and report.params_after["non_embedding"] == n
    c = loaded.config
    assert c.num_hidden_layers == len(report.kept_layers) < 8
    assert c.num_attention_heads == 2 * c.num_key_value_heads and c.head_dim == 8
    assert {0, 7} <= set(report.kept_layers)  # first and last layer kept
    ids = tok(["the pruned model still runs"], return_tensors="pt")["input_ids"]
    lm = AutoModelForCausalLM.from_pretrained(out)
    logits = lm(input_ids=ids).logits
    assert logits.shape[-1] == len(tok) and torch.isfinite(logits).all()
    assert AutoTokenizer.from_pretrained(out)("x")["input_ids"] == tok("x")["input_ids"]
    assert json.loads((out / "tessera_pruning.json").read_text())["target"] == target


def test_surgery_keeping_everything_is_exact(tiny_llama8_dir):
    model, _, _ = P.load_causal_lm(str(tiny_llama8_dir))
    cfg = model.config
    plan = P.PrunePlan(8, 4, 8, 256, P.config_non_embedding_params(cfg), P.config_non_embedding_params(cfg))
    same = P.apply_pruning(model, list(range(8)), [set(range(256))] * 8, [set(range(4))] * 8, plan)
    ids = torch.randint(5, 1000, (2, 12))
    with torch.inference_mode():
        torch.testing.assert_close(same(input_ids=ids).logits, model(input_ids=ids).logits)
    # dropping KV groups 1 and 2 equals zeroing their query heads' (2..5) share of o_proj
    plan2 = P.PrunePlan(8, 2, 4, 256, 0, 1)
    small = P.apply_pruning(model, list(range(8)), [set(range(256))] * 8, [{0, 3}] * 8, plan2)
    for layer in model.model.layers:
        layer.self_attn.o_proj.weight.data[:, 2 * 8:6 * 8] = 0
    with torch.inference_mode():
        torch.testing.assert_close(small(input_ids=ids).logits, model(input_ids=ids).logits, rtol=1e-4, atol=1e-4)
    # dropping FFN channels equals zeroing their down_proj columns
    keep = set(range(0, 256, 2))
    thin = P.apply_pruning(model, list(range(8)), [keep] * 8, [set(range(4))] * 8, P.PrunePlan(8, 4, 8, 128, 0, 1))
    for layer in model.model.layers:
        layer.mlp.down_proj.weight.data[:, 1::2] = 0
    with torch.inference_mode():
        torch.testing.assert_close(thin(input_ids=ids).logits[..., :4], model(input_ids=ids).logits[..., :4],
                                   rtol=1e-4, atol=1e-4)


def test_recipe_and_retriever_on_the_pruned_model(tiny_llama8_dir, tmp_path):
    from tessera.recipes import run_recipe
    from tessera.retrieval.encoder import build_retriever, check_bidirectional

    dump = run_recipe("retrieval-prune", overrides=[
        f"model={tiny_llama8_dir}", "target_ratio=0.5", "calibration=python-docs", "n_samples=4", "seq_len=64",
        "eval_samples=2", f"dump_dir={tmp_path / 'run'}"])
    res = json.loads((dump / "results.json").read_text())
    assert abs(res["non_embedding_ratio"] - 0.5) < 0.05
    assert res["lm_loss_before"] > 0 and res["lm_loss_after"] > 0
    assert len((dump / "metrics.jsonl").read_text().splitlines()) == 8
    retriever = build_retriever(str(dump / "model"), max_seq_length=32, device="cpu")
    assert check_bidirectional(retriever)
    assert retriever.encode_document(["a pruned retriever"]).shape == (1, 64)


def test_bad_targets(tiny_llama8_dir):
    cfg = smollm2_shape()
    with pytest.raises(InputError, match="target"):
        P.plan_architecture(cfg, 10**12)
    with pytest.raises(InputError, match="depth_share"):
        P.plan_architecture(cfg, 10**6, depth_share=2)
    with pytest.raises(InputError, match="target_ratio"):
        P.prune(str(tiny_llama8_dir), target_ratio=0)


def test_cli_bad_target_is_one_line_exit_2(tiny_llama8_dir, tmp_path):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "tessera.cli", "--quiet", "run", "retrieval-prune", f"model={tiny_llama8_dir}",
                        "target_ratio=0", f"dump_dir={tmp_path / 'run'}"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "target_ratio" in lines[0]
    assert not (tmp_path / "run").exists()  # nothing half-written
