"""BTM's prefix domain classifier, the classifier-weighted ensemble, and the seed gate's held-out curve."""

from __future__ import annotations

import math

import pytest
import torch
from btx_fixtures import tiny_llama_config
from transformers import LlamaForCausalLM

from tessera.btx.baselines import PrefixDomainClassifier, btm_logprobs, btm_perplexity
from tessera.btx.train import HeldOutLoss, TrainSettings, plateau, token_logprobs, train_model
from tessera.errors import InputError


def _domains(n=64, T=24, seed=0):
    """Two 'domains' over a 40-token vocabulary: tokens 3..19 vs 20..39 (plus a shared token 2)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(3, 20, (n, T), generator=g)
    b = torch.randint(20, 40, (n, T), generator=g)
    a[:, ::5] = 2
    b[:, ::5] = 2
    return a, b


def test_prefix_classifier_learns_domains_and_never_sees_the_predicted_token():
    a, b = _domains()
    clf = PrefixDomainClassifier(40, 2).fit([a, b], steps=150, batch_size=32)
    ta, tb = _domains(seed=1)
    assert clf.accuracy(ta, 0, prefix_len=4) == 1.0 and clf.accuracy(tb, 1, prefix_len=4) == 1.0
    lp = clf.prefix_logprobs(ta)
    assert lp.shape == (2, ta.shape[0], ta.shape[1] - 1)
    assert torch.allclose(lp.exp().sum(0), torch.ones(ta.shape[0], ta.shape[1] - 1))
    assert (lp[0, :, 3:].exp() > 0.9).all()  # after a few tokens of domain a, weight on a
    # the weight used to predict token t+1 depends on x_<=t only: changing x_{t+1} leaves it unchanged
    tb2 = tb.clone()
    tb2[:, 6] = 5  # a domain-a token at position 6
    lp1, lp2 = clf.prefix_logprobs(tb), clf.prefix_logprobs(tb2)
    assert torch.equal(lp1[:, :, :6], lp2[:, :, :6]) and not torch.equal(lp1[:, :, 6], lp2[:, :, 6])


def test_classifier_weighted_ensemble_follows_the_classifier():
    good, bad = math.log(0.5), math.log(0.01)
    e0 = torch.tensor([[good] * 6, [bad] * 6])
    e1 = torch.tensor([[bad] * 6, [good] * 6])
    sure = torch.stack([torch.tensor([[0.0] * 6, [-30.0] * 6]), torch.tensor([[-30.0] * 6, [0.0] * 6])])
    assert torch.allclose(btm_logprobs([e0, e1], "classifier", sure), torch.full((2, 6), good), atol=1e-6)
    wrong = sure.flip(0)
    assert btm_perplexity([e0, e1], "classifier", wrong) == pytest.approx(100.0, rel=1e-4)
    half = torch.full((2, 2, 6), math.log(0.5))
    assert torch.allclose(btm_logprobs([e0, e1], "classifier", half), torch.full((2, 6), math.log(0.255)), atol=1e-6)
    with pytest.raises(InputError, match="shape"):
        btm_logprobs([e0, e1], "classifier", None)


def test_held_out_curve_and_plateau(tmp_path):
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(vocab_size=40))
    a, b = _domains(n=48, T=16)
    held = {"a": a[:8], "b": b[:8]}
    cb = HeldOutLoss(held, every=5)
    train_model(model, torch.cat([a[8:], b[8:]]), tmp_path / "t", TrainSettings(steps=20, batch_size=8, lr=1e-2, logging_steps=50),
                callbacks=[cb])
    steps = [r["step"] for r in cb.curve]
    assert steps == [0, 5, 10, 15, 20]
    assert cb.curve[-1]["mean"] < cb.curve[0]["mean"] - 0.3  # it learned the two token ranges
    last = {n: float(-token_logprobs(model, x).mean()) for n, x in held.items()}
    assert cb.curve[-1]["loss"] == pytest.approx(last, rel=1e-5)
    p = plateau(cb.curve)  # reference row: step 15 (0.8 * 20)
    assert p == pytest.approx((cb.curve[3]["mean"] - cb.curve[4]["mean"]) / cb.curve[3]["mean"])
    flat = [{"step": s, "mean": 2.0} for s in (0, 50, 100)]
    assert plateau(flat) == 0.0
    with pytest.raises(InputError):
        plateau(flat[:1])
