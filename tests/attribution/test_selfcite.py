"""SelfCite reward arithmetic, KV-cache reuse, best-of-N and the reward-only search (tiny random model)."""

import math

import pytest
from attribution_fixtures import one_thread  # noqa: F401

from tessera.attribution.constrained import generate_cited
from tessera.attribution.format import CitationContext, CitePrompt, span_numbers
from tessera.attribution.selfcite import (
    SelfCiteScorer,
    best_of_n,
    cite,
    cite_answer,
    mean_token_logprob,
    prob_drop,
    prob_hold,
    reward_search,
    selfcite_reward,
)
from tessera.errors import InputError

WORDS = "apple river stone cloud maple tiger violin lemon harbor candle".split()
TEXT = " ".join(f"The {w} is a thing we discuss here." for w in WORDS)


@pytest.fixture(scope="module")
def setup(tiny_lm):
    ctx = CitationContext.from_text(TEXT)
    prompt = CitePrompt(tiny_lm.tokenizer, ctx, "Which things are discussed?")
    resp = generate_cited(tiny_lm, prompt, answer_statements=["The apple is discussed.", "So is the violin here."],
                          max_new_tokens=96)
    return ctx, prompt, resp


def test_reward_functions():
    assert prob_drop(-1.0, -3.0) == 2.0 and prob_hold(-1.5, -1.0) == -0.5
    assert selfcite_reward(2.0, -0.5) == 1.5
    assert selfcite_reward(2.0, -0.5, cited_tokens=400, n_cited=2) == 1.5 - 1000  # SelfCite's length penalty
    assert selfcite_reward(2.0, -0.5, cited_tokens=400, n_cited=1) == 1.5         # one long sentence is fine


@pytest.mark.parametrize("reuse", [True, False])
def test_reward_matches_direct_computation(tiny_lm, setup, reuse):
    ctx, prompt, resp = setup
    scorer = SelfCiteScorer(tiny_lm, prompt, resp, reuse_cache=reuse, batch_size=3)
    cands = [[(1, 1)], [(3, 4)], [(2, 2), (7, 9)], [(10, 10)], [(1, 10)]]
    n = len(ctx)
    for j in range(len(resp.statements)):
        a, b = resp.statement_tokens[j]
        resp_ids = resp.response_ids[:b]
        full = mean_token_logprob(tiny_lm.model, prompt.ids() + resp_ids, b - a)
        for spans, sc in zip(cands, scorer.score(j, cands)):
            keep = span_numbers(spans)
            removed = mean_token_logprob(tiny_lm.model, prompt.ids(set(range(1, n + 1)) - set(keep)) + resp_ids, b - a)
            held = mean_token_logprob(tiny_lm.model, prompt.ids(keep) + resp_ids, b - a)
            assert sc.logp_full == pytest.approx(full, abs=2e-4)
            assert sc.logp_removed == pytest.approx(removed, abs=2e-4)
            assert sc.logp_hold == pytest.approx(held, abs=2e-4)
            assert sc.prob_drop == pytest.approx(full - removed, abs=3e-4)
            assert sc.prob_hold == pytest.approx(held - full, abs=3e-4)
            assert sc.reward == pytest.approx(held - removed, abs=3e-4)
    if reuse:  # the cached scorer ran only suffixes: fewer tokens than full prompts
        full_tokens = scorer.stats.sequences * (len(prompt) + len(resp.response_ids))
        assert scorer.stats.tokens < 0.8 * full_tokens
    assert scorer.stats.sequences == 2 * len(cands) * len(resp.statements)


def test_best_of_n_never_lowers_the_reward(tiny_lm, setup):
    ctx, prompt, resp = setup
    for seed in range(3):
        scorer = SelfCiteScorer(tiny_lm, prompt, resp)
        original = [scorer.score(j, [s.spans])[0].reward for j, s in enumerate(resp.statements)]
        res = best_of_n(tiny_lm, prompt, resp, n=6, temperature=1.5, seed=seed, scorer=scorer)
        assert [s.text for s in res.statements] == [s.text for s in resp.statements]  # statements never change
        for st, orig, table in zip(res.statements, original, res.candidates):
            assert st.reward >= orig - 1e-9
            assert st.reward == max(c["reward"] for c in table)
            assert sum(c["chosen"] for c in table) == 1
            assert all(1 <= a <= b <= len(ctx) for a, b in st.spans) and len(st.spans) <= 3
        assert res.stats["sampling"]["forward_calls"] > 0


def test_reward_search_never_lowers_the_reward(tiny_lm, setup):
    ctx, prompt, resp = setup
    scorer = SelfCiteScorer(tiny_lm, prompt, resp)
    original = [scorer.score(j, [s.spans])[0].reward for j, s in enumerate(resp.statements)]
    res = reward_search(tiny_lm, prompt, resp, top_k=3, scorer=scorer)
    for st, orig in zip(res.statements, original):
        assert st.reward >= orig - 1e-9 and 1 <= len(st.spans) <= 3


def test_cite_answer_maps_citations_to_documents(tiny_lm):
    docs = {"d1": "Header line. " + TEXT, "d2": "Rome is old. Paris is big."}
    passages = [{"number": 1, "doc_id": "d1", "title": "Things", "text": TEXT, "start": len("Header line. ")},
                {"number": 2, "doc_id": "d2", "title": "Cities", "text": docs["d2"], "start": 0}]
    statements = cite_answer(tiny_lm, "What is old?", passages, answer="Rome is old. It is a city.")
    assert [s.text for s in statements] == ["Rome is old.", "It is a city."]
    for st in statements:
        assert st.cited and st.reward is not None and not math.isnan(st.reward)
        for c in st.cited:
            assert docs[c.doc_id][c.start:c.end] == c.text and c.source in (1, 2)
    best = cite_answer(tiny_lm, "What is old?", passages, answer="Rome is old.", best_of=4)
    assert len(best) == 1 and best[0].cited


def test_cite_errors(tiny_lm):
    ctx = CitationContext.from_text(TEXT)
    with pytest.raises(InputError, match="best-of"):
        cite(tiny_lm, ctx, "q?", best_of=-1)
    with pytest.raises(InputError, match="answer to cite is empty"):
        cite(tiny_lm, ctx, "q?", answer="   ")
    with pytest.raises(InputError, match="hold no text"):
        cite_answer(tiny_lm, "q?", [{"text": " ", "doc_id": "x", "start": 0}])


class _Hook:
    """A ``should_stop`` hook that fires from its ``fire_at``-th poll on, counting model forwards after that."""

    def __init__(self, lm, fire_at: int | None = None):
        self.fire_at, self.polls, self.forwards, self.forwards_after = fire_at, 0, 0, 0
        self.fired = False
        # every model pass embeds its input once, through transformers' forward or tessera's engine
        self._handle = lm.model.get_input_embeddings().register_forward_hook(self._on_forward)

    def _on_forward(self, *_):
        self.forwards += 1
        self.forwards_after += self.fired

    def __call__(self) -> bool:
        self.polls += 1
        self.fired = self.fire_at is not None and self.polls >= self.fire_at
        return self.fired

    def remove(self):
        self._handle.remove()


CANCEL_PASSAGES = [{"number": 1, "doc_id": "d1", "title": "Things", "text": TEXT, "start": 0}]
CANCEL_ANSWER = "The apple is discussed. So is the violin. The tiger is named too."


@pytest.mark.parametrize("best_of", [0, 3])
def test_cite_answer_stops_promptly_when_the_hook_fires(tiny_lm, best_of):
    from tessera.errors import Cancelled, TesseraError

    kw = dict(best_of=best_of, answer=CANCEL_ANSWER, max_new_tokens=160)
    plain = cite_answer(tiny_lm, "Which things?", CANCEL_PASSAGES, **kw)
    never = _Hook(tiny_lm)
    try:
        hooked = cite_answer(tiny_lm, "Which things?", CANCEL_PASSAGES, should_stop=never, **kw)
    finally:
        never.remove()
    # a hook that never fires changes nothing; it is polled before every forward (and between statements)
    assert [(s.text, s.reward) for s in hooked] == [(s.text, s.reward) for s in plain] and len(plain) == 3
    assert never.polls >= never.forwards > 3
    for fire_at in (1, never.polls // 2, never.polls):
        hook = _Hook(tiny_lm, fire_at)
        try:
            with pytest.raises(Cancelled, match="stopped by the caller") as err:
                cite_answer(tiny_lm, "Which things?", CANCEL_PASSAGES, should_stop=hook, **kw)
        finally:
            hook.remove()
        assert isinstance(err.value, TesseraError)
        assert hook.fired and hook.polls == fire_at  # raised at the first poll that fired
        assert hook.forwards_after == 0 and hook.forwards < never.forwards


def test_scoring_stops_between_passes_and_hook_exceptions_propagate(tiny_lm, setup):
    from tessera.errors import Cancelled

    ctx, prompt, resp = setup
    hook = _Hook(tiny_lm, fire_at=3)  # polls: statement 1, its first scoring pass, the second pass
    try:
        with pytest.raises(Cancelled, match="SelfCite scoring"):
            reward_search(tiny_lm, prompt, resp, scorer=SelfCiteScorer(tiny_lm, prompt, resp), should_stop=hook)
    finally:
        hook.remove()
    assert hook.forwards == 1 and hook.forwards_after == 0  # one scoring pass ran, then it stopped

    def deadline() -> bool:
        raise TimeoutError("past the deadline")

    with pytest.raises(TimeoutError, match="past the deadline"):
        cite(tiny_lm, ctx, "Which things?", answer="The apple is discussed.", should_stop=deadline)
