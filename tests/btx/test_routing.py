"""BTX routing: load-balancing losses, routing variants, frozen experts, MoE finetuning, BTM ensemble."""

from __future__ import annotations

import math

import pytest
import torch
from btx_fixtures import make_experts
from transformers import AutoModelForCausalLM

from tessera.btx.baselines import btm_logprobs
from tessera.btx.mix import mix_experts
from tessera.btx.routing import (
    BTXRouter,
    btx_load_balancing_loss,
    freeze_experts,
    hf_load_balancing_loss,
    load_btx_model,
    routing_fractions,
    routing_gates,
    set_routing,
)
from tessera.errors import InputError


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe")
    ex = make_experts(root, n=3)
    mix_experts(ex, root / "moe")
    return root / "moe"


def test_balance_loss_uniform_router_is_alpha_per_layer_and_minimal():
    layers = (torch.zeros(50, 4), torch.zeros(50, 4), torch.zeros(50, 4))
    assert btx_load_balancing_loss(layers, top_k=2, alpha=0.01).item() == pytest.approx(0.03, abs=1e-7)
    g = torch.Generator().manual_seed(0)
    for scale in (0.5, 2.0, 8.0):
        skewed = tuple(torch.randn(50, 4, generator=g) * scale + torch.tensor([2.0, 0, 0, 0]) for _ in range(3))
        assert btx_load_balancing_loss(skewed, top_k=2).item() > 0.03


def test_balance_loss_matches_hand_computation():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0]])
    p = torch.softmax(logits, -1)
    # top-2 per token, softmax over the selected logits
    g0 = torch.softmax(torch.tensor([2.0, 0.0]), -1)  # experts 0, 1
    g1 = torch.softmax(torch.tensor([1.0, 0.0]), -1)  # experts 1, then 0 (tie with 2 broken by index)
    gates = torch.tensor([[g0[0], g0[1], 0.0], [g1[1], g1[0], 0.0]])
    u, pm = gates.mean(0), p.mean(0)
    want = 0.01 * 3 * (u * pm).sum()
    got = btx_load_balancing_loss((logits,), top_k=2, alpha=0.01)
    assert got.item() == pytest.approx(want.item(), rel=1e-6)
    assert torch.allclose(routing_gates(logits, 2), gates, atol=1e-6)
    # padding tokens are left out
    masked = btx_load_balancing_loss((torch.cat([logits, torch.tensor([[9.0, -9, -9]])]),), 2, torch.tensor([[1, 1, 0]]))
    assert masked.item() == pytest.approx(want.item(), rel=1e-6)
    # differentiable through u and p
    x = logits.clone().requires_grad_(True)
    btx_load_balancing_loss((x,), 2).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_hf_aux_loss_differs_from_btx():
    g = torch.Generator().manual_seed(1)
    layers = tuple(torch.randn(40, 4, generator=g) for _ in range(2))
    hf = hf_load_balancing_loss(layers, 4, 2)
    # transformers: dispatch fraction pooled over layers x mean prob pooled over layers, times N
    probs = torch.softmax(torch.cat(layers), -1)
    idx = probs.topk(2, -1).indices
    frac = torch.zeros(4).scatter_add_(0, idx.reshape(-1), torch.ones(idx.numel())) / probs.shape[0]
    assert hf.item() == pytest.approx(4 * (frac * probs.mean(0)).sum().item(), rel=1e-5)
    assert btx_load_balancing_loss(layers, 2, alpha=1.0).item() != pytest.approx(hf.item(), rel=1e-3)


def test_routing_variants(moe_dir):
    x = torch.randint(3, 96, (2, 8))
    m = load_btx_model(moe_dir, dtype=torch.float32, device="cpu")
    base = m(x).logits
    set_routing(m, "switch")
    assert isinstance(m.model.layers[0].mlp.gate, BTXRouter) and m.config.num_experts_per_tok == 1
    logits, w, idx = m.model.layers[0].mlp.gate(torch.randn(5, 32))
    assert idx.shape == (5, 1) and torch.allclose(w, torch.softmax(logits, -1).max(-1, keepdim=True).values)
    assert (w < 1).all()  # Switch: the gate is the probability, not renormalised to 1
    assert not torch.allclose(m(x).logits, base)
    set_routing(m, "soft")
    assert m.config.num_experts_per_tok == 3 and not isinstance(m.model.layers[0].mlp.gate, BTXRouter)
    set_routing(m, "sample")
    m.train()
    torch.manual_seed(0)
    picks = {int(m.model.layers[0].mlp.gate(torch.zeros(1, 32))[2]) for _ in range(40)}
    assert len(picks) > 1  # sampled from a (here uniform) softmax
    m.eval()
    set_routing(m, "topk", 2)
    assert torch.allclose(m(x).logits, base, atol=1e-6)
    with pytest.raises(InputError):
        set_routing(m, "hash")


def test_switch_routing_survives_save_and_load(moe_dir, tmp_path):
    m = load_btx_model(moe_dir, dtype=torch.float32, device="cpu")
    set_routing(m, "switch")
    m.save_pretrained(tmp_path / "sw")
    again = load_btx_model(tmp_path / "sw", dtype=torch.float32, device="cpu")
    assert isinstance(again.model.layers[1].mlp.gate, BTXRouter)
    x = torch.randint(3, 96, (1, 6))
    assert torch.allclose(again(x).logits, m(x).logits, atol=1e-6)
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "sw")  # stock transformers still loads it
    assert stock.config.num_experts_per_tok == 1


def test_moe_finetune_trains_router_and_keeps_frozen_experts(moe_dir, tmp_path):
    from tessera.btx.train import TrainSettings, train_model

    m = load_btx_model(moe_dir, dtype=torch.float32, device="cpu")
    n = freeze_experts(m)
    assert n == sum(p.numel() for layer in m.model.layers for p in layer.mlp.experts.parameters())
    experts0 = m.model.layers[0].mlp.experts.down_proj.detach().clone()
    router0 = m.model.layers[0].mlp.gate.weight.detach().clone()
    blocks = torch.randint(3, 96, (16, 16))
    m, hist = train_model(m, blocks, tmp_path / "t", TrainSettings(steps=4, batch_size=4, lr=1e-2, logging_steps=1), moe=True)
    assert torch.equal(m.model.layers[0].mlp.experts.down_proj, experts0)
    assert not torch.equal(m.model.layers[0].mlp.gate.weight, router0)
    logged = [r for r in hist if "loss" in r]
    assert logged and all("balance_loss" in r and r["balance_loss"] > 0 for r in logged)


def test_hf_balance_option_uses_transformers_aux_loss(moe_dir, tmp_path):
    from tessera.btx.train import TrainSettings, train_model

    m = load_btx_model(moe_dir, dtype=torch.float32, device="cpu")
    m, hist = train_model(m, torch.randint(3, 96, (8, 16)), tmp_path / "t", TrainSettings(steps=2, batch_size=4, logging_steps=1),
                          moe=True, balance="hf", balance_coef=0.001)
    assert m.router_aux_loss_coef == 0.001
    assert all(r["balance_loss"] > 0.9 for r in hist if "loss" in r)  # unscaled aux loss is about 1 when balanced


def test_routing_fractions_rows_sum_to_one(moe_dir):
    m = load_btx_model(moe_dir, dtype=torch.float32, device="cpu")
    fr = routing_fractions(m, torch.randint(3, 96, (3, 10)), batch_size=2)
    assert fr.shape == (2, 3) and torch.allclose(fr.sum(-1), torch.ones(2))
    set_routing(m, "soft")
    fr = routing_fractions(m, torch.randint(3, 96, (2, 10)))
    assert torch.allclose(fr.sum(-1), torch.ones(2))


def test_btm_picks_the_expert_that_explains_the_prefix():
    # expert 0 is good on the first block, expert 1 on the second
    good, bad = math.log(0.5), math.log(0.01)
    e0 = torch.tensor([[good] * 6, [bad] * 6])
    e1 = torch.tensor([[bad] * 6, [good] * 6])
    top1 = btm_logprobs([e0, e1], "top1")
    assert top1[0, 0].item() == pytest.approx(math.log((0.5 + 0.01) / 2))  # no prefix yet: uniform mixture
    assert torch.allclose(top1[:, 1:], torch.full((2, 5), good))
    post = btm_logprobs([e0, e1], "posterior")
    assert (post[:, 2:] > good - 0.05).all() and (post <= good + 1e-6).all()
    # no peeking: a token's own probability does not choose its expert
    e0b = e0.clone()
    e0b[1, 3] = 0.0
    assert btm_logprobs([e0b, e1], "top1")[1, 3].item() == pytest.approx(good)
