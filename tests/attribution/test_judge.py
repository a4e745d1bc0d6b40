"""The optional LM judge: lenient parsing of its verdicts; runs on the tiny model without crashing."""

from attribution_fixtures import one_thread  # noqa: F401

from tessera.attribution.format import ContextSentence, Statement
from tessera.attribution.judge import judge_citations, parse_relevance, parse_support


def test_parse_verdicts():
    assert parse_support("[[Fully supported]]") == 1.0
    assert parse_support("I think it is partially supported.") == 0.5
    assert parse_support("[[No support]] at all") == 0.0
    assert parse_support("banana") is None
    assert parse_relevance("[[Irrelevant]]") == 0.0 and parse_relevance("Relevant.") == 1.0 and parse_relevance("?") is None


def test_judge_on_tiny_model(tiny_lm):
    sts = [Statement("The code is 7391.", cited=[ContextSentence(1, "The secret code is 7391.")]), Statement("Uncited.")]
    out = judge_citations(tiny_lm, sts, max_new_tokens=4)
    assert 0.0 <= out["judge_recall"] <= 0.5 and 0.0 <= out["judge_precision"] <= 1.0
    assert out["judge_calls"] == 2 and 0 <= out["judge_unparsed"] <= 2
