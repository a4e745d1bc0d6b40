"""Blocks: per-token equivalence, routing capacity, causality of the auxiliary routers, masks, FLOPs."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from mm_helpers import tiny_batch, tiny_data, tiny_lm  # noqa: E402

from tessera.models.blocks import Block, ExpertChoiceMoE, ForwardContext, apply_rope  # noqa: E402
from tessera.models.decoder import MixedModalConfig, build_block, timestep_embedding  # noqa: E402
from tessera.models.flops import forward_flops_per_token  # noqa: E402
from tessera.models.masks import causal_mask, transfusion_mask  # noqa: E402
from tessera.models.modality import IMAGE, TEXT, ModalityRouter  # noqa: E402
from tessera.models.routers import expert_capacity, load_balancing_loss, token_choice_route  # noqa: E402


def _ctx(modality, mask=None, routing="batch"):
    B, T = modality.shape
    return ForwardContext(index=ModalityRouter().route(modality), modality=modality,
                          positions=torch.arange(T).expand(B, T), mask=mask, routing=routing)


def _pick(per, m):
    return per.mods[m] if len(per.mods) > 1 else per.mods[0]


def reference_block(block: Block, x, modality, mask=None, ffn_group=None):
    """Token by token: every token through the modules of its own modality, attention written out."""
    B, T, d = x.shape
    H = block.n_heads
    qkv = torch.stack([torch.stack([_pick(block.wqkv, int(modality[b, t]))(_pick(block.attn_norm, int(modality[b, t]))(x[b, t]))
                                    for t in range(T)]) for b in range(B)])
    q, k, v = qkv.view(B, T, 3, H, d // H).permute(2, 0, 3, 1, 4)
    pos = torch.arange(T).expand(B, T)
    q, k = apply_rope(q, pos), apply_rope(k, pos)
    scores = q @ k.transpose(-1, -2) / math.sqrt(d // H)
    m = causal_mask(T)[None, None] if mask is None else mask
    a = (scores.masked_fill(~m, float("-inf")).softmax(-1) @ v).transpose(1, 2).reshape(B, T, d)
    x1 = torch.stack([torch.stack([x[b, t] + _pick(block.wo, int(modality[b, t]))(a[b, t]) for t in range(T)])
                      for b in range(B)])
    if ffn_group is not None:  # MoMa: the modality's expert group sees exactly that modality's tokens
        return x1 + ffn_group(x1, modality)
    return torch.stack([torch.stack([x1[b, t] + _pick(block.ffn, int(modality[b, t]))(
        _pick(block.ffn_norm, int(modality[b, t]))(x1[b, t])) for t in range(T)]) for b in range(B)])


@pytest.mark.parametrize("variant", ["dense", "mot"])
@pytest.mark.parametrize("transfusion", [False, True])
def test_block_equals_token_by_token_modules(variant, transfusion):
    torch.manual_seed(0)
    cfg = MixedModalConfig(vocab_size=50, d_model=16, n_heads=2, n_layers=1, variant=variant)
    block = build_block(cfg, 0)
    modality = torch.tensor([[0, 0, 1, 1, 1, 0, 0], [0, 1, 1, 1, 0, 0, 0]])
    mask = transfusion_mask(torch.where(modality == IMAGE, 0, -1)) if transfusion else None
    x = torch.randn(2, 7, 16)
    with torch.no_grad():
        got = block(x, _ctx(modality, mask))
        want = reference_block(block, x, modality, mask)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    if variant == "mot":  # untied: swapping modules changes the result
        assert block.wqkv.mods[0].weight.data_ptr() != block.wqkv.mods[1].weight.data_ptr()


def test_modality_index_sorts_slices_and_restores_sequence_order():
    modality = torch.tensor([[0, 1, 1, 0], [1, 0, 0, 1]])
    ix = ModalityRouter().route(modality)
    x = torch.arange(8.0)[:, None].expand(8, 3)
    xs = ix.sort(x)
    text, image = ix.slices(xs)
    assert text[:, 0].tolist() == [0, 3, 5, 6] and image[:, 0].tolist() == [1, 2, 4, 7]
    assert torch.equal(ix.unsort(xs), x) and ix.mixed and ix.counts == [4, 4]
    one = ModalityRouter().route(torch.zeros(2, 3, dtype=torch.long))
    y = x[:6]
    assert not one.mixed and one.sort(y) is y and one.unsort(y) is y  # one modality: nothing is gathered
    with pytest.raises(ValueError, match="modality ids"):
        ModalityRouter().route(torch.tensor([[0, 2]]))


@pytest.mark.parametrize("rows", ["text_only", "image_only", "mixed"])
def test_mot_block_matches_reference_whatever_modalities_are_present(rows):
    """The block's modality-ordered path (both modalities) and its plain path (one) give the reference."""
    torch.manual_seed(1)
    cfg = MixedModalConfig(vocab_size=50, d_model=16, n_heads=2, n_layers=1, variant="mot")
    block = build_block(cfg, 0)
    modality = {"text_only": torch.zeros(2, 5, dtype=torch.long), "image_only": torch.ones(2, 5, dtype=torch.long),
                "mixed": torch.tensor([[1, 0, 1, 0, 1], [0, 0, 0, 0, 1]])}[rows]
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        torch.testing.assert_close(block(x, _ctx(modality)), reference_block(block, x, modality), atol=1e-5, rtol=1e-5)
    x.requires_grad_(True)
    block(x, _ctx(modality)).sum().backward()
    used = {0} if rows == "text_only" else {1} if rows == "image_only" else {0, 1}
    for m in (0, 1):  # gradients reach exactly the modules of the modalities present
        g = block.wqkv.mods[m].weight.grad
        assert (g is not None and bool(g.abs().sum() > 0)) == (m in used)


@pytest.mark.parametrize("variant", ["mot", "moma", "mot_mod"])
@pytest.mark.parametrize("setting", ["chameleon", "transfusion"])
def test_decoder_in_modality_order_equals_block_by_block(variant, setting):
    """MoT / MoMa keep the residual stream in modality order across blocks (MoD blocks fall back to each
    block sorting for itself): the same hidden states as running every block in sequence order."""
    data = tiny_data(setting)
    model = tiny_lm(setting, variant, data).model.eval()
    b = tiny_batch(data)
    tokens, modality = b["tokens"], b["modality"]
    B, T = tokens.shape
    kw = {}
    if setting == "transfusion":
        kw = {"patches": b["patches"], "timesteps": torch.full((B, T), 300)}
    with torch.no_grad():
        got, ctx = model(tokens, modality, b.get("mask"), **kw)
        # the reference: the same embeddings, then each block on [B, T, d] as a standalone module
        x = model.embed(tokens)
        if setting == "transfusion":
            img = ctx.index.idx[IMAGE]
            xf = x.reshape(B * T, -1).clone()
            xf[img] = model.patch_in(b["patches"].reshape(B * T, -1)[img]) + model.time_mlp(
                timestep_embedding(torch.full((img.numel(),), 300), model.cfg.d_model))
            x = xf.view(B, T, -1)
        ref_ctx = _ctx(modality, b.get("mask"))
        for layer in model.layers:
            x = layer(x, ref_ctx)
        want = model.norm(x.reshape(B * T, -1), ref_ctx.index).view(B, T, -1)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_moma_block_routes_each_modality_to_its_own_group():
    torch.manual_seed(0)
    cfg = MixedModalConfig(vocab_size=50, d_model=16, n_heads=2, n_layers=1, variant="moma", n_text_experts=2,
                           n_image_experts=3)
    block = build_block(cfg, 0)
    modality = torch.tensor([[0, 0, 1, 1, 1, 0, 0, 1], [0, 1, 1, 1, 0, 0, 0, 0]])
    x = torch.randn(2, 8, 16)

    def groups(x1, mod):
        out = torch.zeros_like(x1)
        flat, mflat = x1.reshape(-1, 16), mod.reshape(-1)
        for m in (TEXT, IMAGE):
            ids = torch.nonzero(mflat == m).squeeze(1)
            sub = _ctx(mod)
            h = block.ffn_norm.mods[0](flat[ids])
            out.view(-1, 16)[ids] = block.ffn.mods[m](h, sub)  # the group sees only its modality's tokens
        return out

    with torch.no_grad():
        ctx = _ctx(modality)
        got = block(x, ctx)
        want = reference_block(block, x, modality, None, ffn_group=groups)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    chosen = ctx.stats["moma0.chosen"][0], ctx.stats["moma1.chosen"][0]
    n_text, n_img = int((modality == TEXT).sum()), int((modality == IMAGE).sum())
    assert chosen[0].shape == (2, expert_capacity(n_text, 2)) and chosen[1].shape == (3, expert_capacity(n_img, 3))
    assert int(chosen[0].max()) < n_text and int(chosen[1].max()) < n_img  # indices into the group's own tokens


@pytest.mark.parametrize("n,E,c", [(16, 4, 1.0), (17, 4, 1.0), (30, 8, 2.0), (5, 8, 1.0)])
def test_expert_choice_capacity_exact_quotas(n, E, c):
    torch.manual_seed(0)
    moe = ExpertChoiceMoE(8, 16, E, capacity_factor=c)
    ctx = _ctx(torch.zeros(1, n, dtype=torch.long))
    moe(torch.randn(n, 8), ctx)
    chosen = ctx.stats["moe_ec.chosen"][0]
    k = expert_capacity(n, E, c)
    assert k == min(n, math.ceil(c * n / E))
    assert chosen.shape == (E, k)
    for e in range(E):  # every expert exactly its quota, distinct tokens
        assert len(set(chosen[e].tolist())) == k


def test_token_choice_balance_loss():
    probs = torch.full((8, 4), 0.25)
    ids = torch.arange(8).remainder(4)[:, None]
    assert float(load_balancing_loss(probs, ids)) == pytest.approx(1.0)
    skew = torch.tensor([[0.97, 0.01, 0.01, 0.01]]).expand(8, 4)
    assert float(load_balancing_loss(skew, torch.zeros(8, 1, dtype=torch.long))) > 3.5
    _, ids2, w = token_choice_route(torch.randn(5, 4), top_k=2)
    assert ids2.shape == (5, 2) and torch.allclose(w.sum(-1), torch.ones(5))


def _hidden(lm, batch, routing):
    with torch.no_grad():
        return lm.model(batch["tokens"], batch["modality"], routing=routing)[0]


@pytest.mark.parametrize("variant", ["moma", "moe_ec", "moma_mod"])
def test_aux_router_path_is_causal_batch_expert_choice_is_not(variant):
    data = tiny_data("chameleon")
    lm = tiny_lm("chameleon", variant, data).eval()
    batch = tiny_batch(data, 8)
    j = 60
    changed = {k: v.clone() for k, v in batch.items()}
    g = torch.Generator().manual_seed(1)
    changed["tokens"][:, j:] = torch.randint(0, 256, changed["tokens"][:, j:].shape, generator=g)
    changed["modality"][:, j:] = TEXT
    a_aux, b_aux = _hidden(lm, batch, "aux"), _hidden(lm, changed, "aux")
    torch.testing.assert_close(a_aux[:, :j], b_aux[:, :j], atol=1e-6, rtol=1e-6)  # the past is untouched
    a_b, b_b = _hidden(lm, batch, "batch"), _hidden(lm, changed, "batch")
    assert (a_b[:, :j] - b_b[:, :j]).abs().max() > 1e-4  # batch routing lets the future move the past


def test_transfusion_mask_causal_across_bidirectional_within_image():
    image_id = torch.tensor([[-1, -1, 0, 0, 0, -1, -1, 1, 1, -1]])
    m = transfusion_mask(image_id)[0, 0]
    T = image_id.shape[1]
    for i in range(T):
        for j in range(T):
            same = image_id[0, i] >= 0 and image_id[0, i] == image_id[0, j]
            assert bool(m[i, j]) == (j <= i or bool(same)), (i, j)
    # end to end: a later patch of the same image changes an earlier patch; later text changes no image patch
    data = tiny_data("transfusion")
    lm = tiny_lm("transfusion", "mot", data).eval()
    batch = tiny_batch(data, 16, seed=3)
    b = int(torch.nonzero(~batch["understanding"] & (batch["labels"] >= 0))[0])
    img_pos = torch.nonzero(batch["modality"][b] == IMAGE).squeeze(1)
    T = batch["tokens"].shape[1]
    t = torch.full((16, T), 500)

    def run(patches, tokens):
        with torch.no_grad():
            return lm.model(tokens, batch["modality"], mask=transfusion_mask(batch["image_id"]), patches=patches,
                            timesteps=t)[0][b]

    base = run(batch["patches"], batch["tokens"])
    p2 = batch["patches"].clone()
    p2[b, img_pos[-1]] += 1.0
    moved = run(p2, batch["tokens"])
    assert (moved[img_pos[0]] - base[img_pos[0]]).abs().max() > 1e-4  # bidirectional inside the image
    assert torch.allclose(moved[: img_pos[0]], base[: img_pos[0]], atol=1e-6)  # causal for earlier text
    tok2 = batch["tokens"].clone()
    tok2[b, img_pos[-1] + 2] = 65  # a token after EOI
    later = run(batch["patches"], tok2)
    assert torch.allclose(later[: img_pos[-1] + 2], base[: img_pos[-1] + 2], atol=1e-6)


def test_dense_and_mot_equal_flops_per_token_analytic_and_measured():
    from torch.utils.flop_counter import FlopCounterMode

    data = tiny_data("chameleon")
    batch = tiny_batch(data, 4)
    B, T = batch["tokens"].shape
    measured, analytic = {}, {}
    for variant in ("dense", "mot"):
        lm = tiny_lm("chameleon", variant, data).eval()
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            lm(batch)
        measured[variant] = fc.get_total_flops()
        analytic[variant] = forward_flops_per_token(lm.cfg, T, TEXT) * B * T
        assert forward_flops_per_token(lm.cfg, T, TEXT) == forward_flops_per_token(lm.cfg, T, IMAGE)
    assert measured["dense"] == measured["mot"]
    assert analytic["dense"] == analytic["mot"]
    # torch's counter counts the SDPA kernel on some backends only (not the CPU flash kernel)
    attn = lm.cfg.n_layers * 4 * T * lm.cfg.d_model * B * T
    assert measured["dense"] in (analytic["dense"], analytic["dense"] - attn)
    counted_attn = measured["dense"] == analytic["dense"]
    # MoMa: same expert shapes, plus routers; expert choice capacity rounds up per group
    lm = tiny_lm("chameleon", "moma", data).eval()
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        lm(batch)
    an = forward_flops_per_token(lm.cfg, T, TEXT) * B * T
    got = fc.get_total_flops() + (0 if counted_attn else attn)
    assert abs(got - an) / an < 0.03
    assert an > analytic["dense"]  # routers cost a little


def test_mod_flops_and_capacity():
    data = tiny_data("chameleon")
    lm = tiny_lm("chameleon", "dense_mod", data)
    dense = tiny_lm("chameleon", "dense", data)
    T = data.seq_len
    assert forward_flops_per_token(lm.cfg, T) < forward_flops_per_token(dense.cfg, T)
    out = lm(tiny_batch(data, 4))
    k = math.ceil(0.25 * T)
    assert float(out["mod_selected_fraction"]) == pytest.approx(k / T)


@pytest.mark.parametrize("transfusion", [False, True])
def test_mod_causal_path_computes_only_the_selected_tokens_and_matches_the_masked_block(transfusion):
    from dataclasses import replace

    from tessera.models.blocks import MoDBlock

    torch.manual_seed(0)
    cfg = MixedModalConfig(vocab_size=50, d_model=16, n_heads=2, n_layers=2, variant="mot_mod")
    mod = build_block(cfg, 1)
    assert isinstance(mod, MoDBlock)
    B, T = 3, 12
    modality = torch.tensor([[0] * 3 + [1] * 6 + [0] * 3, [0] * 12, [0, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0]])
    mask = transfusion_mask(torch.where(modality == IMAGE, 0, -1)) if transfusion else None
    x = torch.randn(B, T, 16)
    with torch.no_grad():
        selected = mod.aux(x).squeeze(-1) > 0
        assert 0 < int(selected.sum()) < B * T and len(set(selected.sum(1).tolist())) > 1  # uneven selections
        seen = []
        hook = mod.block.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[1]))
        got = mod(x, _ctx(modality, mask, routing="aux"))
        hook.remove()
        assert seen == [int(selected.sum(1).max())]  # only the longest selection's length went through the block
        # reference: the block over every token with keys restricted to the selected ones (the old path)
        base = mask if mask is not None else causal_mask(T)[None, None]
        ref_mask = (base & selected[:, None, None, :]) | torch.eye(T, dtype=torch.bool)[None, None]
        ys = mod.block(x, replace(_ctx(modality, mask, routing="aux"), mask=ref_mask))
        w = torch.sigmoid(mod.router(x).squeeze(-1))
        want = torch.where(selected[..., None], x + w[..., None] * (ys - x), x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", ["moma_mod", "moe_tc"])
def test_aux_losses_survive_fsdp_rebuilding_block_inputs(variant):
    """FSDP2 with a bf16 policy (the CUDA path) rebuilds each block's input containers before the block runs
    (``cast_forward_inputs`` -> ``_apply_to_tensors``: every dataclass, dict and list is copied).  The same
    rebuilding as a pre-hook on every block leaves the auxiliary losses and stats as without it."""
    from torch.distributed.utils import _apply_to_tensors

    data = tiny_data("chameleon")
    b = tiny_batch(data)

    def run(rebuild: bool) -> dict:
        lm = tiny_lm("chameleon", variant, data)
        if rebuild:
            for layer in lm.model.layers:
                layer.register_forward_pre_hook(
                    lambda mod, args, kwargs: (_apply_to_tensors(lambda t: t.clone(), args),
                                               _apply_to_tensors(lambda t: t.clone(), kwargs)), with_kwargs=True)
        return lm(b)

    plain, rebuilt = run(False), run(True)
    aux = {k for k in plain if k in ("aux_router", "load_balance") or k.endswith(("acc", "fraction"))}
    assert aux, "the variant should report auxiliary losses or routing stats"
    for k in aux:
        torch.testing.assert_close(rebuilt[k], plain[k])
    torch.testing.assert_close(rebuilt["loss"], plain["loss"])


def test_rope_angles_are_computed_once_per_context_and_afresh_for_a_token_subset():
    from tessera.models.blocks import rope_cos_sin

    modality = torch.tensor([[TEXT, IMAGE, IMAGE, TEXT, TEXT, IMAGE]])
    ctx = _ctx(modality)
    cs = ctx.rope(8, 10000.0, torch.float32)
    assert ctx.rope(8, 10000.0, torch.float32) is cs  # every layer reuses the first layer's angles
    sel = torch.tensor([[1, 4, 5]])
    sub = ctx.subset(sel, ModalityRouter())  # MoD: the selected tokens keep their own positions
    got = sub.rope(8, 10000.0, torch.float32)
    want = rope_cos_sin(torch.tensor([[1, 4, 5]]), 8, 10000.0)
    assert got[0].shape == (1, 1, 3, 4) and all(torch.equal(g, w) for g, w in zip(got, want))
    assert ctx.rope(8, 10000.0, torch.float32) is cs and cs[0].shape == (1, 1, 6, 4)
