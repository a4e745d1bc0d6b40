"""Integration: the API on the embedded defaults (SmolLM2-135M-Instruct, Python's docs), streamed, with citations."""

from __future__ import annotations

import pytest

from serve_helpers import sse_events

pytestmark = pytest.mark.integration


def test_stream_real_answer_with_citations_into_python_docs(embedded_lm, tmp_path):
    from fastapi.testclient import TestClient

    from tessera.data.text import python_docs_corpus
    from tessera.serve import ServeConfig, create_app

    app = create_app(ServeConfig(encoder=None, upload_dir=str(tmp_path / "uploads")), lm=embedded_lm)
    with TestClient(app) as c:
        assert c.get("/v1/corpora").json()["default"] == "python-docs"
        body = {"question": "How do I give a function parameter a default value?", "cite": True, "k": 2,
                "max_new_tokens": 24}
        events = sse_events(c.post("/v1/ask/stream", json=body).text)
    kinds = [e for e, _ in events]
    assert kinds[:2] == ["queued", "sources"] and kinds[-1] == "result", kinds
    out = events[-1][1]
    tokens = [d["text"] for e, d in events if e == "token"]
    assert len(tokens) >= 5 and "".join(tokens).strip() == out["answer"]
    docs = {d.id: d.text for d in python_docs_corpus()}
    assert out["sources"] and all(s["doc_id"] in docs for s in out["sources"])
    for s in out["sources"]:  # a source is its document's text at the offsets it names
        assert docs[s["doc_id"]][s["start"]:s["start"] + len(s["text"])] == s["text"]
    assert out["statements"] and out["timings"]["cite_s"] > 0
    for st in out["statements"]:
        for cit in st["citations"]:
            for sent in cit["sentences"]:
                assert " ".join(docs[cit["doc_id"]][sent["start"]:sent["end"]].split()) == sent["text"]
