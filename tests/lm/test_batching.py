"""Continuous batching on llama.cpp (tessera.lm.batching) with the embedded GGUF: same answers, freed slots."""

from __future__ import annotations

import threading
import time

import pytest

from tessera.errors import ContextTooLongError
from tessera.lm import llamacpp
from tessera.lm.local import LocalLM

QUESTIONS = ["What is a Python list?", "Explain the with statement in Python.", "How do decorators work?",
             "Write a haiku about the sea."]


@pytest.fixture(scope="module")
def lm(embedded_lm_dir):
    if not llamacpp.available():
        pytest.skip("llama-cpp-python is not installed (make install builds it; optional)")
    model = LocalLM.load("default", engine="llamacpp")
    yield model
    model.disable_batching()


@pytest.fixture(scope="module")
def prompts(lm):
    return [lm.encode_chat([{"role": "user", "content": q}]) for q in QUESTIONS]


def _concurrently(fn, n: int) -> list:
    out: list = [None] * n
    errors: list = []

    def run(i):
        try:
            out[i] = fn(i)
        except BaseException as e:  # noqa: BLE001 - re-raised below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    if errors:
        raise errors[0]
    return out


def test_concurrent_greedy_answers_equal_each_alone(lm, prompts):
    assert lm.enable_batching(4) == "batched"
    # alone: one at a time through the batch's context (the one-at-a-time context runs flash attention, whose
    # float sums differ from the batch's plain attention: a few greedy tokens in a hundred then differ)
    alone = ["".join(lm.stream(p, max_new_tokens=40)) for p in prompts]
    before = lm.batcher.stats.row_steps, lm.batcher.stats.steps
    together = _concurrently(lambda i: "".join(lm.stream(prompts[i], max_new_tokens=40)), len(prompts))
    assert together == alone
    rows, steps = lm.batcher.stats.row_steps - before[0], lm.batcher.stats.steps - before[1]
    assert rows / steps > 1.5  # the rows really shared steps
    assert lm.batcher.counts() == (0, 0)


def test_each_row_keeps_its_own_settings(lm, prompts):
    lm.enable_batching(4)
    b = lm.batcher
    ids = [p[0].tolist() for p in prompts]
    lengths = [3, 17, 9, 30]
    outs = _concurrently(lambda i: list(b.stream(ids[i], lengths[i], stop_ids=())), 4)
    assert [len(o) for o in outs] == lengths
    # sampled rows: the same seed gives the same tokens whoever shares the batch, another seed other tokens
    sampled = lambda seed: list(b.stream(ids[3], 24, (), temperature=1.0, seed=seed))  # noqa: E731
    first = sampled(7)
    beside = _concurrently(lambda i: sampled(7) if i == 0 else list(b.stream(ids[i], 24, ())), 3)
    assert beside[0] == first and sampled(8) != first


def test_a_closed_stream_frees_its_slot(lm, prompts):
    lm.enable_batching(2)
    b = lm.batcher
    ids = prompts[0][0].tolist()
    stream = b.stream(ids, 400, stop_ids=())
    next(stream)
    assert b.counts() == (1, 0)
    stream.close()  # the client went away
    deadline = time.monotonic() + 10
    while b.counts() != (0, 0) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert b.counts() == (0, 0)
    assert b.stats.cancelled >= 1
    # the freed cells are reusable: two more full generations fit beside each other
    assert [len(o) for o in _concurrently(lambda i: list(b.stream(ids, 8, ())), 2)] == [8, 8]


def test_more_requests_than_slots_wait_and_long_ones_run_alone(lm, prompts):
    from tessera.lm.batching import ContinuousBatcher

    lm.disable_batching()
    serial = "".join(lm.stream(prompts[0], max_new_tokens=48))  # the one-at-a-time context
    b = ContinuousBatcher(lm._llama, max_batch=2, slot_ctx=256)
    try:
        ids = [p[0].tolist() for p in prompts]
        outs = _concurrently(lambda i: list(b.stream(ids[i], 12, ())), 4)
        assert [len(o) for o in outs] == [12] * 4 and b.stats.peak_rows == 2  # two waited for a free slot
        assert not b.fits(len(ids[0]), 256 - len(ids[0]) + 1)
        with pytest.raises(ContextTooLongError, match="a batch slot holds 256"):
            list(b.stream(ids[0], 300, ()))
        lm.batcher = b  # a generation longer than a slot runs on the one-at-a-time context instead
        served = b.stats.served
        assert "".join(lm.stream(prompts[0], max_new_tokens=48))  # fits: through the batch
        assert b.stats.served == served + 1
        long = "".join(lm.stream(prompts[0], max_new_tokens=256))
        assert b.stats.served == served + 1 and long.startswith(serial)
    finally:
        lm.disable_batching()
