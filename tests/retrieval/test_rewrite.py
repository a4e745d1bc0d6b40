"""Query rewriting: parsing the LM's reasoning + expanded query, fallbacks, the cache."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "lm"))

from scripted import ScriptedBackend  # noqa: E402

from tessera.errors import InputError  # noqa: E402
from tessera.retrieval.rewrite import RewriteCache, rewrite_queries, rewrite_stats  # noqa: E402


def reply(conv, t):
    q = conv[-1]["content"]
    if "broken" in q:
        return "it is about stuff without any structure"
    if "nested" in q:
        return 'r", "expanded_query": {"type": "json", "data": [{"name": "energy balance"}, 7]}}'
    if "fail" in q:
        return RuntimeError("HTTP 500")
    return 'needs mechanisms of X", "expanded_query": "X mechanism Y evidence"}'


def test_rewrite_modes_and_fallbacks():
    b = ScriptedBackend(reply)
    rws = rewrite_queries(b, ["what is X", "broken one", "fail"], "reason")
    assert rws[0].text == "what is X\nneeds mechanisms of X\nX mechanism Y evidence" and rws[0].method in ("json", "repaired")
    assert rws[1].method == "repaired" and rws[1].text.startswith("broken one\nit is about stuff")  # the started reply closed
    assert rws[2].method == "failed" and rws[2].text == "fail"
    assert b.calls[0]["prefix"] == '{"reasoning": "'
    assert [r.text for r in rewrite_queries(b, ["a"], "none")] == ["a"]
    assert rewrite_stats(rws)["methods"]["failed"] == 1
    nested = rewrite_queries(b, ["nested"], "reason")[0]
    assert nested.expanded == "json energy balance" and "{" not in nested.text
    with pytest.raises(InputError):
        rewrite_queries(b, ["a"], "hyde")


def test_cache_reuses_rewrites(tmp_path):
    b = ScriptedBackend(reply)
    c = RewriteCache(tmp_path / "rw.jsonl", "m", "reason", 64)
    first = c.rewrite(b, ["what is X", "what is Y"], "reason", 64)
    again = RewriteCache(tmp_path / "rw.jsonl", "m", "reason", 64).rewrite(b, ["what is Y", "what is X"], "reason", 64)
    assert [r.text for r in again] == [first[1].text, first[0].text]
    assert len(b.calls) == 1  # the second run generated nothing
    RewriteCache(tmp_path / "rw.jsonl", "m", "reason", 128).rewrite(b, ["what is X"], "reason", 128)
    assert len(b.calls) == 2  # another length is another rewrite
