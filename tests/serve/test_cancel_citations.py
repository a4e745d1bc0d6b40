"""A request that times out while its SelfCite citations are scored frees the single worker at once."""

from __future__ import annotations

import time

STATEMENTS = ["Green tea is steeped at 80 degrees.", "Black tea takes boiling water.", "Oolong sits in between.",
              "Tea needs hot water.", "Green tea steeps for two minutes.", "Black tea is strong."]


def test_timeout_in_the_citation_phase_frees_the_worker(make_client, monkeypatch):
    from tessera.attribution import selfcite

    c = make_client(queue_size=1, request_timeout_s=30.0)
    worker = c.app.state.tessera.worker
    passes = []
    run = selfcite.SelfCiteScorer._run

    def slow_run(self, rows):
        # each scoring pass takes 0.3 s; the first one runs past the request's deadline
        if not passes:
            for task in list(worker._running):
                task.deadline = time.monotonic()
        passes.append(len(rows))
        time.sleep(0.3)
        return run(self, rows)

    monkeypatch.setattr(selfcite.SelfCiteScorer, "_run", slow_run)
    # six statements to cite whatever the random model answers: >= 6 scoring passes when not stopped
    monkeypatch.setattr(selfcite, "split_statements", lambda answer: list(STATEMENTS))

    t0 = time.monotonic()
    r = c.post("/v1/ask", json={"question": "At what temperature is green tea steeped?", "decode": "nest", "cite": True,
                                "k": 2, "max_new_tokens": 24})  # NEST copies from the passages: a non-empty answer
    assert r.status_code == 504, r.text
    assert r.json()["error"]["code"] == "timeout"
    assert passes == [2]  # the citation phase was reached and stopped after its first scoring pass
    assert time.monotonic() - t0 < 20.0
    deadline = time.monotonic() + 2.0
    while worker.counts() != (0, 0) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert c.get("/healthz").json()["queue"]["running"] == 0

    t1 = time.monotonic()
    r = c.post("/v1/ask", json={"question": "green tea", "max_new_tokens": 2})
    assert r.status_code == 200, r.text
    assert r.json()["timings"]["queue_s"] < 0.5  # not stuck behind the abandoned scoring
    assert time.monotonic() - t1 < 15.0
    assert passes == [2]
