"""``tessera serve --lm-url``: generation forwarded to a scripted OpenAI-compatible server on 127.0.0.1, several
requests at once, and what the server says is unavailable when only the model's tokenizer is here."""

from __future__ import annotations

import json
import shutil
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

ANSWER = ["Green", " tea", " is", " steeped", " at", " 80", " degrees."]


class Scripted:
    """Streams ANSWER for every ``/v1/completions`` request, one piece every 50 ms; records what it was sent."""

    def __init__(self):
        self.requests: list[dict] = []
        self.in_flight = self.max_in_flight = 0
        self.lock = threading.Lock()

    def handler(self):
        stub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                assert self.path == "/v1/completions" and body["stream"] is True
                with stub.lock:
                    stub.requests.append(body)
                    stub.in_flight += 1
                    stub.max_in_flight = max(stub.max_in_flight, stub.in_flight)
                try:
                    self.send_response(200)
                    self.send_header("Content-Type", "text/event-stream")
                    self.send_header("Connection", "close")
                    self.end_headers()
                    for i, piece in enumerate(ANSWER):
                        time.sleep(0.05)
                        done = "stop" if i == len(ANSWER) - 1 else None
                        chunk = {"id": "c", "object": "text_completion", "created": 0, "model": body["model"],
                                 "choices": [{"index": 0, "text": piece, "finish_reason": done, "logprobs": None}]}
                        self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                        self.wfile.flush()
                    self.wfile.write(b"data: [DONE]\n\n")
                    self.wfile.flush()
                finally:
                    with stub.lock:
                        stub.in_flight -= 1

        return Handler


@pytest.fixture()
def lm_server():
    stub = Scripted()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), stub.handler())
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield stub, f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    httpd.shutdown()
    httpd.server_close()


def _client(lm: str, url: str, tmp_path, small_corpus_dir, **extra):
    from fastapi.testclient import TestClient

    from tessera.serve import ServeConfig, create_app

    cfg = ServeConfig(lm=lm, lm_url=url, corpora=[str(small_corpus_dir)], encoder=None,
                      upload_dir=str(tmp_path / "uploads"), max_new_tokens=16, **extra)
    return TestClient(create_app(cfg))


def test_answers_come_from_the_server_several_at_once(lm_server, tiny_lm_dir, tmp_path, small_corpus_dir):
    stub, url = lm_server
    with _client(str(tiny_lm_dir), url, tmp_path, small_corpus_dir, lm_model="served-name", max_batch=3) as c:
        h = c.get("/healthz").json()
        assert h["engine"] == "openai"
        assert h["batching"]["mode"] == "concurrent" and h["batching"]["workers"] == 3
        f = h["features"]
        assert url in f["generate"]["where"]
        assert f["cite"]["available"] and "this machine" in f["cite"]["note"]
        assert not f["dense"]["available"]
        out: list = [None] * 3
        q = "At what temperature is green tea steeped?"
        threads = [threading.Thread(target=lambda i=i: out.__setitem__(i, c.post("/v1/ask", json={"question": q, "k": 1})))
                   for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert [r.status_code for r in out] == [200, 200, 200], [r.text for r in out]
    assert {r.json()["answer"] for r in out} == {"".join(ANSWER)}
    assert all(r["model"] == "served-name" for r in stub.requests) and len(stub.requests) == 3
    assert stub.max_in_flight >= 2  # the requests reached the LM server together


def test_features_that_need_local_weights_are_refused_without_them(lm_server, tiny_lm_dir, tmp_path, small_corpus_dir):
    stub, url = lm_server
    tokenizer_only = tmp_path / "tokenizer-only"
    tokenizer_only.mkdir()
    for p in tiny_lm_dir.iterdir():
        if p.is_file() and not p.name.endswith((".safetensors", ".bin")):
            shutil.copy(p, tokenizer_only / p.name)
    with _client(str(tokenizer_only), url, tmp_path, small_corpus_dir) as c:
        f = c.get("/healthz").json()["features"]
        assert not f["cite"]["available"] and not f["nest"]["available"]
        assert "tokenizer" in f["cite"]["note"]
        for body, field in (({"cite": True}, "cite"), ({"decode": "nest"}, "decode")):
            r = c.post("/v1/ask", json={"question": "green tea", "k": 1, **body})
            assert r.status_code == 400, r.text
            assert r.json()["error"]["code"] == "feature_unavailable" and r.json()["error"]["field"] == field
        r = c.post("/v1/ask", json={"question": "green tea", "k": 1})
        assert r.status_code == 200 and r.json()["answer"] == "".join(ANSWER)
    assert len(stub.requests) == 1
