"""benchmarks/_common.run_all: jobs in a pool of spawned workers; work that depends on earlier results joins the pool."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from _common import run_all  # noqa: E402


@pytest.mark.parametrize("workers", [1, 2])
def test_jobs_returned_by_on_done_join_the_pool(workers):
    seen = []

    def on_done(key, result):
        seen.append(key)
        # the follow-up depends on the result it follows (pow is picklable, so it runs in spawned workers too)
        return {"follow": (result, 2)} if key == "b" else None

    out = run_all(pow, {"a": (2, 3), "b": (3, 2)}, workers, on_done)
    assert out == {"a": 8, "b": 9, "follow": 81}
    assert list(out) == ["a", "b", "follow"] and sorted(seen) == ["a", "b", "follow"] and seen[-1] == "follow"


def test_a_key_added_twice_is_refused():
    with pytest.raises(ValueError, match="added twice"):
        run_all(pow, {"a": (2, 3)}, 1, lambda key, result: {"a": (1, 1)})


def test_a_failed_job_stops_the_queue():
    seen = []
    # pow(0, -1) raises ZeroDivisionError in the worker; the jobs queued behind it never start
    with pytest.raises(ZeroDivisionError):
        run_all(pow, {"bad": (0, -1), **{f"j{i}": (2, i) for i in range(50)}}, 1, lambda key, result: seen.append(key))
    assert seen == []
