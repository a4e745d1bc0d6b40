"""Integration: concurrent requests on the embedded GGUF decode together (--max-batch) and leave cleanly."""

from __future__ import annotations

import threading
import time

import pytest

from tessera.lm import llamacpp

pytestmark = pytest.mark.integration

QUESTIONS = ["How do I give a function parameter a default value?", "What does the with statement do?",
             "What is a lambda expression?"]


@pytest.fixture(scope="module")
def llama_lm(embedded_lm_dir):
    if not llamacpp.available():
        pytest.skip("llama-cpp-python is not installed (make install builds it; optional)")
    from tessera.lm.local import LocalLM

    return LocalLM.load("default", engine="llamacpp")


@pytest.fixture()
def client(llama_lm, tmp_path):
    from fastapi.testclient import TestClient

    from tessera.serve import ServeConfig, create_app

    def make(max_batch: int):
        app = create_app(ServeConfig(encoder=None, upload_dir=str(tmp_path / "uploads"), max_batch=max_batch),
                         lm=llama_lm)
        return TestClient(app)

    return make


def _ask(c, question: str) -> dict:
    r = c.post("/v1/ask", json={"question": question, "k": 2, "max_new_tokens": 32})
    assert r.status_code == 200, r.text
    return r.json()


def test_concurrent_greedy_requests_answer_as_each_alone(client, llama_lm):
    with client(1) as c:
        assert c.get("/healthz").json()["batching"]["mode"] == "serial"
        assert _ask(c, QUESTIONS[0])["answer"]
    with client(3) as c:
        health = c.get("/healthz").json()
        assert health["batching"]["mode"] == "batched" and health["queue"]["capacity"] == 8 + 3
        # alone: one request at a time through the batch (the one-at-a-time llama.cpp path reuses the cached
        # prefix of the previous prompt, which evaluates the rest of the prompt in other chunks: its float
        # sums, and now and then a greedy token, differ from a prompt evaluated whole)
        alone = [_ask(c, q)["answer"] for q in QUESTIONS]
        out: list = [None] * len(QUESTIONS)
        threads = [threading.Thread(target=lambda i=i: out.__setitem__(i, _ask(c, QUESTIONS[i])))
                   for i in range(len(QUESTIONS))]
        steps0, rows0 = llama_lm.batcher.stats.steps, llama_lm.batcher.stats.row_steps
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        assert [o["answer"] for o in out] == alone
        assert llama_lm.batcher.stats.peak_rows >= 2  # they really decoded together
        assert (llama_lm.batcher.stats.row_steps - rows0) > (llama_lm.batcher.stats.steps - steps0)
    assert llama_lm.batcher is None  # the server's shutdown stopped its batcher


def test_a_dropped_stream_frees_its_slot(client, llama_lm):
    with client(2) as c:
        body = {"question": QUESTIONS[0], "k": 2, "max_new_tokens": 400}
        with c.stream("POST", "/v1/ask/stream", json=body) as r:
            for line in r.iter_lines():
                if line.startswith("event: token"):
                    break  # the client leaves mid-answer
        assert llama_lm.batcher.counts()[0] <= 1
        deadline = time.monotonic() + 30
        while (c.get("/healthz").json()["queue"]["running"] or llama_lm.batcher.counts() != (0, 0)) \
                and time.monotonic() < deadline:
            time.sleep(0.05)
        assert c.get("/healthz").json()["queue"]["running"] == 0 and llama_lm.batcher.counts() == (0, 0)
        assert llama_lm.batcher.stats.cancelled == 1
        assert llama_lm.batcher.stats.new_tokens < 400
        assert _ask(c, QUESTIONS[1])["answer"]  # the server goes on answering
