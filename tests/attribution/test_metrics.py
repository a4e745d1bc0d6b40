"""Citation P/R/F1 and answer EM/F1 against hand-computed values."""

import pytest

from tessera.attribution.format import ContextSentence, Statement
from tessera.attribution.metrics import answer_contains, answer_em, answer_f1, citation_scores, mean_scores, prf


def test_prf_hand_computed():
    assert prf({1, 2, 3}, {2, 3, 4, 5}) == pytest.approx((2 / 3, 2 / 4, 2 * (2 / 3) * 0.5 / (2 / 3 + 0.5)))
    assert prf(set(), {1}) == (0.0, 0.0, 0.0)
    assert prf({1}, {2}) == (0.0, 0.0, 0.0)
    assert prf(set(), set()) == (1.0, 1.0, 1.0)
    assert prf({1}, {1}) == (1.0, 1.0, 1.0)


def _st(text, keys):
    return Statement(text, cited=[ContextSentence(i + 1, "s", key=k) for i, k in enumerate(keys)])


def test_citation_scores_per_answer_and_per_statement():
    gold = {("A", 0), ("B", 1)}
    sts = [_st("one", [("A", 0), ("C", 2)]), _st("two", [("B", 1)]), _st("three", [])]
    s = citation_scores(sts, gold)
    # union {A0, C2, B1}: P = 2/3, R = 2/2, F1 = 0.8
    assert s["precision"] == pytest.approx(2 / 3) and s["recall"] == 1.0 and s["f1"] == pytest.approx(0.8)
    # per statement: (1/2, 1/2, 1/2), (1, 1/2, 2/3), (0, 0, 0)
    assert s["statement_precision"] == pytest.approx((0.5 + 1 + 0) / 3)
    assert s["statement_recall"] == pytest.approx((0.5 + 0.5 + 0) / 3)
    assert s["statement_f1"] == pytest.approx((0.5 + 2 / 3 + 0) / 3)
    assert (s["cited_sentences"], s["gold_sentences"], s["statements"]) == (3, 2, 3)
    empty = citation_scores([], gold)
    assert empty["f1"] == 0.0 and empty["statements"] == 0


def test_answer_metrics_hotpot_normalisation():
    assert answer_em("The Eiffel Tower!", "eiffel tower") == 1.0
    assert answer_f1("the big red dog", "red dog") == pytest.approx(2 * (2 / 3) * 1 / (2 / 3 + 1))
    assert answer_f1("yes it is", "yes") == 0.0  # yes/no must match exactly (HotpotQA)
    assert answer_f1("no", "no") == 1.0
    assert answer_contains("It was Peter Schmeichel, the goalkeeper.", "Peter Schmeichel") == 1.0
    assert answer_contains("Petersen", "Peter") == 0.0


def test_mean_scores():
    assert mean_scores([{"f1": 1.0, "x": "s"}, {"f1": 0.0}, {"f1": 0.5, "n": 2}]) == {"f1": 0.5, "n": 2.0}
