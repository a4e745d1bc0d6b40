"""MoMa Gumbel-sigmoid router noise (section 2.2, eq. 5): on in training, off at evaluation, quotas exact."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from mm_helpers import tiny_batch, tiny_data, tiny_lm  # noqa: E402

from tessera.models.blocks import ExpertChoiceMoE, ForwardContext  # noqa: E402
from tessera.models.modality import ModalityRouter  # noqa: E402
from tessera.models.routers import expert_capacity, router_scores  # noqa: E402


def _chosen(moe: ExpertChoiceMoE, x: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    modality = torch.zeros(1, x.shape[0], dtype=torch.long)
    ctx = ForwardContext(index=ModalityRouter().route(modality), modality=modality,
                         positions=torch.arange(x.shape[0])[None], mask=None, routing="batch")
    torch.manual_seed(seed)
    out = moe(x, ctx)
    return ctx.stats["moe_ec.chosen"][0], out


def test_router_scores_noise_only_in_training():
    logits = torch.randn(64, 4)
    plain = torch.sigmoid(logits)
    torch.testing.assert_close(router_scores(logits, "gumbel", training=False), plain, rtol=0, atol=0)
    torch.testing.assert_close(router_scores(logits, "none", training=True), plain, rtol=0, atol=0)
    torch.manual_seed(0)
    a = router_scores(logits, "gumbel", training=True)
    torch.manual_seed(0)
    b = router_scores(logits, "gumbel", training=True)
    torch.testing.assert_close(a, b, rtol=0, atol=0)  # seeded through torch's global generator
    assert (a - plain).abs().max() > 0.05 and bool(((a > 0) & (a < 1)).all())
    # G' - G'' is standard logistic: mean 0, variance pi^2 / 3
    torch.manual_seed(1)
    z = torch.logit(router_scores(torch.zeros(200_000, 1), "gumbel", training=True).double())
    assert abs(float(z.mean())) < 0.03 and float(z.var()) == pytest.approx(torch.pi ** 2 / 3, rel=0.03)
    with pytest.raises(ValueError, match="router_noise"):
        router_scores(logits, "gaussian", training=True)


def test_expert_choice_noise_changes_selection_in_train_mode_quotas_exact():
    torch.manual_seed(0)
    n, E = 40, 4
    moe = ExpertChoiceMoE(16, 32, E, router_noise="gumbel")
    x = torch.randn(n, 16)
    k = expert_capacity(n, E)
    moe.train()
    c0, o0 = _chosen(moe, x, seed=0)
    c1, o1 = _chosen(moe, x, seed=1)
    c0b, o0b = _chosen(moe, x, seed=0)
    assert not torch.equal(c0, c1) and not torch.allclose(o0, o1)  # the noise explores
    assert torch.equal(c0, c0b) and torch.equal(o0, o0b)  # same seed, same draw
    for c in (c0, c1):
        assert c.shape == (E, k) and all(len(set(c[e].tolist())) == k for e in range(E))
    # eval mode: no noise, deterministic whatever the seed, and equal to the no-noise router
    moe.eval()
    plain = ExpertChoiceMoE(16, 32, E, router_noise="none").eval()
    plain.load_state_dict(moe.state_dict())
    e0, p0 = _chosen(moe, x, seed=0)
    e1, p1 = _chosen(moe, x, seed=1)
    ref_c, ref = _chosen(plain, x, seed=2)
    assert torch.equal(e0, e1) and torch.equal(e0, ref_c)
    torch.testing.assert_close(p0, p1, rtol=0, atol=0)
    torch.testing.assert_close(p0, ref, rtol=0, atol=0)
    with pytest.raises(ValueError, match="router_noise"):
        ExpertChoiceMoE(16, 32, E, router_noise="gaussian")


@pytest.mark.parametrize("variant", ["moma", "moe_ec"])
def test_model_with_noise_equals_noise_free_model_in_eval(variant):
    data = tiny_data("chameleon")
    batch = tiny_batch(data, 6)
    noisy, plain = tiny_lm("chameleon", variant, data, router_noise="gumbel"), tiny_lm("chameleon", variant, data)
    assert noisy.model.cfg.router_noise == "gumbel"
    plain.load_state_dict(noisy.state_dict())

    def hidden(lm, seed):
        torch.manual_seed(seed)
        with torch.no_grad():
            return lm.model(batch["tokens"], batch["modality"], routing="batch")[0]

    noisy.eval(), plain.eval()
    torch.testing.assert_close(hidden(noisy, 0), hidden(noisy, 1), rtol=0, atol=0)
    torch.testing.assert_close(hidden(noisy, 0), hidden(plain, 0), rtol=0, atol=0)
    noisy.train(), plain.train()
    assert (hidden(noisy, 0) - hidden(noisy, 1)).abs().max() > 1e-4  # noise on in training
    torch.testing.assert_close(hidden(plain, 0), hidden(plain, 1), rtol=0, atol=0)


def test_recipe_accepts_router_noise(tmp_path):
    from tessera.recipes.mixed_modal_pretrain import Config, main, model_config
    from tessera_testing import run_cli

    assert model_config(Config(variant="moma", router_noise="gumbel"), 300, 0).router_noise == "gumbel"
    out = main(Config(variant="moma", router_noise="gumbel", d_model=32, n_layers=2, n_heads=4, n_text_experts=2,
                      n_image_experts=2, batch_size=4, steps=2, eval_every=2, eval_batches=1, log_every=1,
                      final_eval=False, classifier_steps=20, n_val_images=50, dump_dir=str(tmp_path / "run"),
                      threads=1))
    assert "router_noise: gumbel" in (out / "config.yaml").read_text()
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "train"] == [1, 2]
    r = run_cli("run", "mixed-modal-pretrain", "router_noise=gaussian", f"dump_dir={tmp_path / 'x'}")
    assert r.returncode == 2 and "router_noise" in r.stderr and not (tmp_path / "x").exists()
