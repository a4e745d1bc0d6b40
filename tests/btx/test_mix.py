"""BTX mixing: the Mixtral checkpoint loads, averages the shared weights and keeps each FFN as an expert."""

from __future__ import annotations

import json

import pytest
import torch
from btx_fixtures import make_experts
from transformers import AutoModelForCausalLM

from tessera.btx.mix import mix_experts
from tessera.btx.routing import forced_expert
from tessera.errors import InputError, ModelNotFoundError


@pytest.fixture(scope="module")
def experts(tmp_path_factory):
    return make_experts(tmp_path_factory.mktemp("experts"), n=3)


def _load(p):
    return AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32).eval()


def test_checkpoint_is_mixtral_on_disk_format_and_loads(experts, tmp_path):
    from safetensors import safe_open

    rep = mix_experts(experts, tmp_path / "moe")
    index = json.loads((tmp_path / "moe" / "model.safetensors.index.json").read_text())["weight_map"]
    assert "model.layers.1.block_sparse_moe.experts.2.w3.weight" in index
    assert "model.layers.0.block_sparse_moe.gate.weight" in index
    assert not any(".mlp." in k for k in index)
    with safe_open(str(tmp_path / "moe" / index["model.layers.0.block_sparse_moe.gate.weight"]), "pt") as f:
        g = f.get_tensor("model.layers.0.block_sparse_moe.gate.weight")
    assert g.shape == (3, 32) and 0.01 < g.std().item() < 0.03  # router N(0, 0.02)
    moe = _load(tmp_path / "moe")
    assert type(moe).__name__ == "MixtralForCausalLM"
    assert moe.config.num_local_experts == 3 and moe.config.num_experts_per_tok == 2 and rep.num_experts == 3
    assert moe.model.layers[0].mlp.experts.gate_up_proj.shape == (3, 128, 32)  # v5 fused layout after conversion
    out = moe.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 7)


def test_shared_weights_are_the_mean_and_ffns_are_kept(experts, tmp_path):
    mix_experts(experts, tmp_path / "moe")
    moe = _load(tmp_path / "moe")
    dense = [_load(p) for p in experts]
    for name in ("model.embed_tokens.weight", "model.layers.1.self_attn.q_proj.weight", "model.layers.0.input_layernorm.weight", "model.norm.weight"):
        mean = torch.stack([d.state_dict()[name] for d in dense]).mean(0)
        assert torch.allclose(moe.state_dict()[name], mean, atol=1e-6), name
    for name in ("model.embed_tokens.weight",):  # experts really differ, so the mean is not trivially one of them
        assert not torch.allclose(dense[0].state_dict()[name], dense[1].state_dict()[name])
    gu = moe.model.layers[1].mlp.experts.gate_up_proj[2]
    assert torch.equal(gu[:64], dense[2].model.layers[1].mlp.gate_proj.weight)
    assert torch.equal(gu[64:], dense[2].model.layers[1].mlp.up_proj.weight)
    assert torch.equal(moe.model.layers[1].mlp.experts.down_proj[2], dense[2].model.layers[1].mlp.down_proj.weight)


@pytest.mark.parametrize("e", [0, 2])
def test_router_forced_to_one_expert_reproduces_its_ffn(experts, tmp_path, e):
    mix_experts(experts, tmp_path / "moe")
    moe = _load(tmp_path / "moe")
    dense = _load(experts[e])
    h = torch.randn(2, 7, 32)
    with torch.no_grad():
        with forced_expert(moe, e):
            got = [moe.model.layers[i].mlp(h) for i in range(2)]
        free = moe.model.layers[0].mlp(h)
        want = [dense.model.layers[i].mlp(h) for i in range(2)]
    for g, w in zip(got, want):
        assert torch.allclose(g, w, atol=1e-6)
    assert not torch.allclose(free, want[0], atol=1e-4)  # the context manager really changed the routing


def test_identical_experts_give_the_dense_models_logits(tmp_path):
    same = make_experts(tmp_path / "same", n=3, identical=True)
    mix_experts(same, tmp_path / "moe")
    moe, dense = _load(tmp_path / "moe"), _load(same[0])
    x = torch.randint(3, 96, (2, 12))
    with torch.no_grad():
        assert torch.allclose(moe(x).logits, dense(x).logits, atol=1e-5)


def test_seed_as_generalist_expert(experts, tmp_path):
    rep = mix_experts(experts[:2], tmp_path / "moe", seed_model=str(experts[2]), include_seed=True)
    moe = _load(tmp_path / "moe")
    seed = _load(experts[2])
    assert rep.num_experts == 3 and moe.config.num_local_experts == 3
    assert torch.equal(moe.model.layers[0].mlp.experts.down_proj[2], seed.model.layers[0].mlp.down_proj.weight)
    a, b = _load(experts[0]), _load(experts[1])
    mean = (a.model.embed_tokens.weight + b.model.embed_tokens.weight) / 2  # shared weights: domain experts only
    assert torch.allclose(moe.model.embed_tokens.weight, mean, atol=1e-6)


def test_split_experts_shapes_and_function(experts, tmp_path):
    rep = mix_experts(experts, tmp_path / "moe", variant="split", chunks=2)
    moe = _load(tmp_path / "moe")
    assert rep.num_experts == 6 and moe.config.num_experts_per_tok == 4 and moe.config.intermediate_size == 32
    assert moe.model.layers[0].mlp.experts.gate_up_proj.shape == (6, 64, 32)
    assert moe.model.layers[0].mlp.experts.down_proj.shape == (6, 32, 32)
    dense = _load(experts[1])
    h = torch.randn(1, 5, 32)
    with torch.no_grad(), forced_expert(moe, [2, 3]):  # both chunks of expert 1, equal gates
        got = moe.model.layers[0].mlp(h)
    assert torch.allclose(got, dense.model.layers[0].mlp(h), atol=1e-5)
    x = torch.randint(3, 96, (1, 6))
    assert moe(x).logits.shape == (1, 6, 96)


def test_blended_experts_shapes_and_function(experts, tmp_path):
    with pytest.raises(InputError, match="divisible"):  # 64 hidden units do not split into 3 domain chunks
        mix_experts(experts, tmp_path / "bad", variant="blend")
    two = experts[:2]
    rep = mix_experts(two, tmp_path / "moe", variant="blend")
    moe = _load(tmp_path / "moe")
    assert rep.num_experts == 2 and moe.model.layers[0].mlp.experts.gate_up_proj.shape == (2, 128, 32)
    d = [_load(p) for p in two]
    h = torch.randn(1, 4, 32)
    with torch.no_grad(), forced_expert(moe, [0, 1]):  # every chunk with gate 1/2 = the mean of the two FFNs
        got = moe.model.layers[1].mlp(h)
    want = (d[0].model.layers[1].mlp(h) + d[1].model.layers[1].mlp(h)) / 2
    assert torch.allclose(got, want, atol=1e-5)
    # and no blended expert equals a domain FFN: each mixes both domains
    assert not torch.allclose(moe.model.layers[1].mlp.experts.down_proj[0], d[0].model.layers[1].mlp.down_proj.weight)


def test_zero_router_and_bad_inputs(experts, tmp_path):
    mix_experts(experts, tmp_path / "moe", router_init="zero")
    assert torch.count_nonzero(_load(tmp_path / "moe").model.layers[0].mlp.gate.weight) == 0
    with pytest.raises(InputError, match="not empty"):
        mix_experts(experts, tmp_path / "moe")
    with pytest.raises(ModelNotFoundError, match="not found"):
        mix_experts([tmp_path / "nope"], tmp_path / "x")
    with pytest.raises(InputError, match="router_init"):
        mix_experts(experts, tmp_path / "y", router_init="magic")
    other = make_experts(tmp_path / "other", n=1, hidden_size=48, num_attention_heads=4)
    with pytest.raises(InputError, match="same seed"):
        mix_experts([experts[0], other[0]], tmp_path / "z")
    assert not (tmp_path / "y").exists() and not (tmp_path / "z").exists()  # nothing half-written
