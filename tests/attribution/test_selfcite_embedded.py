"""The SelfCite reward on the embedded SmolLM2: dropping an irrelevant sentence changes little,
dropping the needed one lowers the statement's probability."""

import pytest
from attribution_fixtures import one_thread  # noqa: F401

from tessera.attribution.constrained import generate_cited
from tessera.attribution.format import CitationContext, CitePrompt
from tessera.attribution.selfcite import SelfCiteScorer

CONTEXT = ("The museum opened in 1921. Bananas are rich in potassium. The secret code of the vault is 7391. "
           "Tennis is played on grass and clay.")


@pytest.mark.integration
def test_reward_on_a_constructed_example(embedded_lm):
    ctx = CitationContext.from_text(CONTEXT)
    assert len(ctx) == 4
    prompt = CitePrompt(embedded_lm.tokenizer, ctx, "What is the secret code of the vault?")
    resp = generate_cited(embedded_lm, prompt, answer_statements=["The secret code of the vault is 7391."], max_new_tokens=64)
    scorer = SelfCiteScorer(embedded_lm, prompt, resp)
    irrelevant, needed = scorer.score(0, [[(2, 2)], [(3, 3)]])
    # removing an irrelevant sentence leaves the statement's probability (and prob_drop) near zero
    assert abs(irrelevant.prob_drop) < 0.1
    # removing the needed sentence lowers it: a large drop, and the needed citation wins the reward
    assert needed.prob_drop > 0.5 and needed.prob_drop > irrelevant.prob_drop + 0.4
    assert needed.reward > irrelevant.reward + 0.5
    # keeping only the needed sentence holds the probability far better than keeping only an irrelevant one
    assert needed.prob_hold > irrelevant.prob_hold
