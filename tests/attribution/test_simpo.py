"""Length-balanced preference pairs, and the selfcite-simpo recipe end to end on the tiny model."""

import json
import random

import pytest
from attribution_fixtures import one_thread, write_tiny_hotpot  # noqa: F401

from tessera.attribution.format import CitationContext, CitePrompt, parse_response, span_numbers
from tessera.attribution.simpo import PreferencePair, is_balanced, length_balance, make_pair


@pytest.mark.parametrize("seed", range(40))
def test_length_balance_matches_chosen(seed):
    rng = random.Random(seed)
    n = rng.randint(12, 40)
    def rand_spans():
        nums = sorted(rng.sample(range(1, n + 1), rng.randint(1, 6)))
        from tessera.attribution.format import spans_from_numbers
        return spans_from_numbers(nums)[:3]
    chosen, rejected = rand_spans(), rand_spans()
    out = length_balance(rejected, chosen, n, rng)
    assert is_balanced(out, chosen), (chosen, rejected, out)
    assert not set(span_numbers(out)) & (set(span_numbers(chosen)) - set(span_numbers(rejected)))
    assert all(1 <= a <= b <= n for a, b in out)
    assert len(out) == len({(a, b) for a, b in out})


def test_length_balance_examples():
    rng = random.Random(0)
    # fewer ranges than chosen: a fake one-sentence range is added away from the chosen ones
    out = length_balance([(2, 2)], [(10, 10), (20, 20)], 30, rng)
    assert len(out) == 2 and len(span_numbers(out)) == 2 and (2, 2) in out
    # more coverage than chosen: shrunk
    out = length_balance([(3, 8)], [(15, 16)], 30, rng)
    assert len(out) == 1 and len(span_numbers(out)) == 2 and set(span_numbers(out)) <= set(range(3, 9))


def test_make_pair_is_length_balanced(tiny_lm):
    ctx = CitationContext.from_text(" ".join(f"Sentence {w} is here." for w in "abcdefghijklmnop"))
    prompt = CitePrompt(tiny_lm.tokenizer, ctx, "q?")
    pair = make_pair("x", prompt, ["First.", "Second."], chosen=[[(3, 4)], [(9, 9), (12, 12)]],
                     original=[[(1, 1)], [(9, 9), (12, 12)]], rng=random.Random(0))
    assert pair is not None and pair.balanced
    chosen, rejected = parse_response(pair.chosen, ctx), parse_response(pair.rejected, ctx)
    for c, r in zip(chosen.statements, rejected.statements):
        assert len(c.spans) == len(r.spans) and len(span_numbers(c.spans)) == len(span_numbers(r.spans))
    assert rejected.statements[1].spans == [(9, 9), (12, 12)]  # unchanged where chosen == original
    assert pair.prompt.startswith(prompt.before) and "<C16>" in pair.prompt
    assert PreferencePair.from_dict(json.loads(json.dumps(pair.to_dict()))) == pair
    assert make_pair("y", prompt, ["A."], chosen=[[(2, 3)]], original=[[(2, 2), (3, 3)]]) is None  # same sentences


def test_recipe_runs_end_to_end(tiny_lm_dir, tmp_path):
    from tessera.recipes import get_recipe, run_recipe

    assert get_recipe("selfcite-simpo").Config().beta == 10.0
    data = write_tiny_hotpot(tmp_path / "hotpot.json", n=4)
    dump = tmp_path / "run"
    out = run_recipe("selfcite-simpo", None, [
        f"lm={tiny_lm_dir}", f"data={data}", f"dump_dir={dump}", "train_start=0", "train_end=3", "eval_start=3",
        "eval_end=4", "max_steps=2", "best_of=6", "max_new_tokens=96", "max_distractors=-1",
        "max_sentences_per_paragraph=-1", "learning_rate=1e-4"])
    assert out == dump
    for name in ("config.yaml", "metrics.jsonl", "results.json", "pairs.jsonl", "model/config.json"):
        assert (dump / name).is_file(), name
    res = json.loads((dump / "results.json").read_text())
    assert res["train"]["steps"] == 2 and res["pairs"]["pairs"] >= 1
    assert res["pairs"]["balanced"] == res["pairs"]["pairs"]
    assert set(res["train_ids"]).isdisjoint(res["eval_ids"])
    assert "f1" in res["before"] and "f1" in res["after"]
    stages = [json.loads(line)["stage"] for line in (dump / "metrics.jsonl").read_text().splitlines()]
    assert stages[0] == "eval_before" and "train" in stages and stages[-1] == "eval_after"
    # resumable: a second run reuses pairs.jsonl rather than rebuilding the pairs
    lines = (dump / "pairs.jsonl").read_text().splitlines()
    run_recipe("selfcite-simpo", None, [f"lm={tiny_lm_dir}", f"data={data}", f"dump_dir={dump}", "train_start=0",
                                       "train_end=3", "evaluate=false", "max_steps=1", "save_model=false",
                                       "max_new_tokens=96", "max_distractors=-1", "max_sentences_per_paragraph=-1"])
    assert (dump / "pairs.jsonl").read_text().splitlines() == lines


def test_recipe_bad_input(tmp_path, tiny_lm_dir):
    from tessera.errors import InputError
    from tessera.recipes import run_recipe

    data = write_tiny_hotpot(tmp_path / "hotpot.json", n=4)
    with pytest.raises(InputError, match="overlap"):
        run_recipe("selfcite-simpo", None, [f"lm={tiny_lm_dir}", f"data={data}", "train_end=3", "eval_start=2", "eval_end=4",
                                           f"dump_dir={tmp_path / 'r'}"])
    with pytest.raises(InputError, match="outside"):
        run_recipe("selfcite-simpo", None, [f"lm={tiny_lm_dir}", f"data={data}", "train_end=30", f"dump_dir={tmp_path / 'r'}"])


def test_recipe_survives_kill_9(tiny_lm_dir, tmp_path):
    """Killed after the first preference pair: the rerun builds the missing pairs as an uninterrupted
    run does (pairs seeded per example), trains and evaluates to the same result."""
    from tessera_testing import kill_midway, lines_at_least

    from tessera.recipes import run_recipe

    data = write_tiny_hotpot(tmp_path / "hotpot.json", n=4)
    args = [f"lm={tiny_lm_dir}", f"data={data}", "train_start=0", "train_end=3", "eval_start=3", "eval_end=4",
            "max_steps=2", "best_of=4", "max_new_tokens=64", "max_distractors=-1", "max_sentences_per_paragraph=-1",
            "learning_rate=1e-4", "save_model=false", "threads=1"]
    run_recipe("selfcite-simpo", None, [*args, f"dump_dir={tmp_path / 'ref'}"])
    dump = tmp_path / "run"
    kill_midway(["run", "selfcite-simpo", *args, f"dump_dir={dump}"], lines_at_least(dump / "pairs.jsonl", 1))
    assert not (dump / "results.json").exists()
    with open(dump / "pairs.jsonl", "ab") as f:  # as if the kill had torn the next line
        f.write(b'{"id": "torn')
    run_recipe("selfcite-simpo", None, [*args, f"dump_dir={dump}"])

    def pairs(d):
        return sorted((json.loads(ln) for ln in (d / "pairs.jsonl").read_text().splitlines() if ln.startswith('{"id": "')
                       and ln.endswith("}")), key=lambda r: r["id"])

    assert pairs(dump) == pairs(tmp_path / "ref") and len(pairs(dump)) == 3

    def result(d):
        res = json.loads((d / "results.json").read_text())
        for k in ("seconds", "config"):
            res.pop(k)
        for part in res.values():
            if isinstance(part, dict):
                part.pop("seconds", None)
        return res

    assert result(dump) == result(tmp_path / "ref")
    stages = [json.loads(ln)["stage"] for ln in (dump / "metrics.jsonl").read_text().splitlines()]
    assert stages.count("eval_before") == 1 and stages.count("pairs") == 1 and stages[-1] == "eval_after"
