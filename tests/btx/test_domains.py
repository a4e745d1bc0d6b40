"""BTX domains from the shared data (WikiText-2 articles, SciFact abstracts) and the benchmark's
training mixture (domain shares ~ blocks**alpha)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tessera_testing import shared_data_or_skip

from tessera.btx.data import BUILTIN_SOURCES, Domain, domain_texts

ROOT = Path(__file__).resolve().parents[2]


def test_wikitext2_domain_splits_articles_of_both_files():
    from tessera.data.text import read_wikitext

    root = shared_data_or_skip("wikitext2")
    train, held = domain_texts(Domain("wiki", "wikitext2"))
    valid = {d.text for d in read_wikitext(root / "valid.txt")}
    test = {d.text for d in read_wikitext(root / "test.txt")}
    assert set(train) | set(held) == valid | test
    assert not set(train) & set(held)
    assert set(train) & valid and set(train) & test  # training text from both files
    assert 0.03 < len(held) / (len(train) + len(held)) < 0.2


def test_scifact_domain_is_the_abstracts():
    shared_data_or_skip("ir", "scifact")
    assert "scifact" in BUILTIN_SOURCES
    train, held = domain_texts(Domain("sci", "scifact"))
    assert len(train) + len(held) == 5183 and not set(train) & set(held)
    assert 0.05 < len(held) / 5183 < 0.15
    title, abstract = train[0].split("\n", 1)
    assert title and len(abstract) > 200


def test_mixture_shares_follow_alpha(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    from btx import mixture_of

    train = {"a": torch.full((10, 4), 0), "b": torch.full((90, 4), 1)}
    assert mixture_of(train, 1.0).shape[0] == 100
    for alpha, share_a in ((1.0, 0.1), (0.5, 0.25), (0.0, 0.5)):
        mix = mixture_of(train, alpha)
        assert mix.shape[0] == 100
        assert (mix[:, 0] == 0).float().mean().item() == pytest.approx(share_a, abs=0.01)
    uniform = mixture_of(train, 0.0)
    assert torch.equal(uniform[:10], train["a"]) and torch.equal(uniform[10:20], train["a"])  # the short domain repeats
