"""The weight EMA (tessera.train.ema): the warmed-up decay, checkpointing beside the model, and the mixed-modal
recipe evaluating the average rather than the raw weights."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from tessera.errors import InputError
from tessera.train import LoopState, load_checkpoint, save_checkpoint
from tessera.train.ema import weight_ema


def test_ema_follows_the_warmed_up_decay():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    ema = weight_ema(model, 0.9)
    expect = [p.detach().clone() for p in model.parameters()]
    for n in range(6):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ema.update_parameters(model)
        d = min(0.9, (1 + n) / (10 + n)) if n else 0.0  # the first update copies the weights
        expect = [e * d + p.detach() * (1 - d) for e, p in zip(expect, model.parameters())]
    for e, a in zip(expect, ema.module.parameters()):
        torch.testing.assert_close(a, e)
    assert int(ema.n_averaged) == 6
    # the average is not the model: it lags behind the last steps
    assert not torch.equal(ema.module.weight, model.weight)


def test_ema_rejects_a_decay_outside_0_1():
    with pytest.raises(ValueError, match="decay"):
        weight_ema(nn.Linear(2, 2), 1.0)


def test_checkpoint_keeps_the_average_and_refuses_to_resume_one_it_lacks(tmp_path):
    model = nn.Linear(3, 2)
    ema = weight_ema(model, 0.99)
    for _ in range(3):
        with torch.no_grad():
            model.weight.add_(1.0)
        ema.update_parameters(model)
    save_checkpoint(tmp_path / "ck", model, None, LoopState(step=3), averaged=ema)
    other = weight_ema(nn.Linear(3, 2), 0.99)
    load_checkpoint(tmp_path / "ck", nn.Linear(3, 2), averaged=other)
    torch.testing.assert_close(other.module.weight, ema.module.weight)
    assert int(other.n_averaged) == 3
    save_checkpoint(tmp_path / "plain", model, None, LoopState(step=3))
    with pytest.raises(InputError, match="no weight average"):
        load_checkpoint(tmp_path / "plain", nn.Linear(3, 2), averaged=other)
    with pytest.raises(InputError, match="does not fit"):
        load_checkpoint(tmp_path / "ck", nn.Linear(3, 2), averaged=weight_ema(nn.Linear(4, 2), 0.99))


def test_mixed_modal_recipe_evaluates_the_average(tmp_path):
    """The final validation losses are the averaged weights' (recomputed from the checkpoint's average), not the
    raw weights'; a bad decay is refused before anything is written."""
    from tessera.models.objectives import MixedModalLM
    from tessera.models.scoring import mean_val_losses, validation_batches
    from tessera.recipes.mixed_modal_pretrain import Config, build_data, main, model_config
    from tessera.train.checkpoint import read_checkpoint

    cfg = Config(setting="transfusion", d_model=32, n_layers=2, n_heads=4, batch_size=4, steps=6, eval_every=3,
                 eval_batches=1, ckpt_every=3, log_every=1, classifier_steps=20, n_val_images=50, final_eval=False,
                 dump_dir=str(tmp_path / "run"), threads=1, ema_decay=0.5)
    out = main(cfg)
    res = json.loads((out / "results.json").read_text())
    ck = read_checkpoint(out / "checkpoint", averaged=True)
    assert ck["averaged"] is not None and int(ck["averaged"]["n_averaged"]) == 6
    assert read_checkpoint(out / "checkpoint")["averaged"] is None  # read only when asked for
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    last_eval = [r for r in rows if r["kind"] == "eval" and r["step"] == 6]
    assert len(last_eval) == 1 and {k: last_eval[0][k] for k in res["val"]["batch"]} == res["val"]["batch"]
    train, val, _, val_idx, _, _ = build_data(cfg)
    mcfg = model_config(cfg, train.vocab.size, train.patch_dim, train.image_len)

    def losses(state: dict) -> dict:
        lm = MixedModalLM(mcfg, "transfusion", diffusion_lambda=cfg.diffusion_lambda, prediction_type=cfg.prediction_type,
                          understanding_max_t=cfg.understanding_max_t, understanding_diffusion=cfg.understanding_diffusion)
        lm.load_state_dict(state)
        return mean_val_losses(lm, validation_batches(val, val_idx, cfg.batch_size, cfg.eval_batches), "cpu", cfg.seed,
                               routing="batch")

    averaged = {k[len("module."):]: v for k, v in ck["averaged"].items() if k.startswith("module.")}
    assert res["val"]["batch"] == losses(averaged)
    assert res["val"]["batch"] != losses(ck["model"])
    with pytest.raises(InputError, match="ema_decay"):
        main(Config(setting="transfusion", dump_dir=str(tmp_path / "bad"), ema_decay=1.0))
    assert not (tmp_path / "bad").exists()


def test_an_ema_under_fsdp_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    """FSDP shards the weights the average would copy: refused at the start, with what to run instead."""
    from tessera.recipes import mixed_modal_pretrain as R
    from tessera.train.loop import DistInfo, resolve_strategy

    assert resolve_strategy(DistInfo(0, 2, 0, "cuda:0"), "auto") == "fsdp"
    assert resolve_strategy(DistInfo(0, 2, 0, "cpu"), "auto") == "ddp"
    assert resolve_strategy(DistInfo(0, 1, 0, "cuda:0"), "fsdp") == "none"
    import tessera.train

    monkeypatch.setattr(tessera.train, "init_distributed", lambda device="": DistInfo(0, 2, 0, "cpu"))  # a 2-rank run
    with pytest.raises(InputError, match="distributed=ddp"):
        R.main(R.Config(setting="transfusion", dump_dir=str(tmp_path / "x"), ema_decay=0.9, distributed="fsdp"))
    assert not (tmp_path / "x").exists()
