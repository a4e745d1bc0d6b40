"""OpenAIBackend against a small OpenAI-compatible stub server on 127.0.0.1 (started here, in a thread)."""

from __future__ import annotations

import json
import math
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tessera.errors import InputError
from tessera.lm.openai_backend import OpenAIBackend


class Stub:
    """Behaviour per request, keyed by the last user message: 'fail500:N' fails N times, 'slow:N' sleeps past the
    client timeout N times, 'bad400' is a client error; anything else is echoed back."""

    def __init__(self):
        self.counts: dict[str, int] = {}
        self.requests: list[dict] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.lock = threading.Lock()


def make_handler(stub: Stub):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def _send(self, code: int, body: dict):
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with stub.lock:
                stub.requests.append(body)
                stub.in_flight += 1
                stub.max_in_flight = max(stub.max_in_flight, stub.in_flight)
            try:
                self._handle(body)
            finally:
                with stub.lock:
                    stub.in_flight -= 1

        def _handle(self, body):
            assert self.path == "/v1/chat/completions"
            user = [m for m in body["messages"] if m["role"] == "user"][-1]["content"]
            with stub.lock:
                n = stub.counts[user] = stub.counts.get(user, 0) + 1
            kind, _, times = user.partition(":")
            if kind == "fail500" and n <= int(times):
                return self._send(500, {"error": {"message": "overloaded"}})
            if kind == "slow" and n <= int(times):
                time.sleep(1.5)
            if kind == "bad400":
                return self._send(400, {"error": {"message": "bad request"}})
            if kind == "wait":
                time.sleep(0.3)
            msg = {"role": "assistant", "content": f"echo {user}"}
            if body["messages"][-1]["role"] == "assistant":  # vLLM continue_final_message: reply continues the prefix
                assert body.get("continue_final_message") is True
                msg["content"] = f" continued {user}\"}}"
            choice = {"index": 0, "message": msg, "finish_reason": "stop"}
            if body.get("logprobs"):
                top = [{"token": " Yes", "logprob": math.log(0.6), "bytes": None}, {"token": "No", "logprob": math.log(0.3), "bytes": None},
                       {"token": "Yes", "logprob": math.log(0.05), "bytes": None}]
                choice["logprobs"] = {"content": [{"token": " Yes", "logprob": math.log(0.6), "bytes": None, "top_logprobs": top}]}
            self._send(200, {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"], "choices": [choice],
                             "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}})

    return Handler


@pytest.fixture()
def server():
    stub = Stub()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(stub))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield stub, f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    httpd.shutdown()
    httpd.server_close()


def conv(text):
    return [{"role": "user", "content": text}]


def test_chat_order_usage_prefix_and_concurrency(server):
    stub, url = server
    b = OpenAIBackend(url, model="m", concurrency=4, timeout=5)
    gens = b.chat([conv(f"wait:{i}") for i in range(8)], max_new_tokens=5)
    assert [g.text for g in gens] == [f"echo wait:{i}" for i in range(8)]
    assert all(g.ok and g.prompt_tokens == 7 and g.new_tokens == 3 for g in gens)
    assert 2 <= stub.max_in_flight <= 4
    assert stub.requests[0]["max_tokens"] == 5 and stub.requests[0]["model"] == "m"
    g = b.chat([conv("p")], prefix='{"query": "')[0]
    assert g.text == '{"query": " continued p"}'
    assert b.stats.conversations == 9 and b.stats.new_tokens == 27


def test_retry_on_500_and_timeout(server):
    stub, url = server
    b = OpenAIBackend(url, model="m", timeout=0.5, max_retries=2, backoff=0.01)
    g = b.chat([conv("fail500:2")])[0]
    assert g.ok and g.text == "echo fail500:2" and stub.counts["fail500:2"] == 3
    g = b.chat([conv("slow:1")])[0]
    assert g.ok and stub.counts["slow:1"] == 2
    assert b.stats.retries == 3 and b.stats.failures == 0


def test_failures_are_recorded_not_raised(server):
    stub, url = server
    b = OpenAIBackend(url, model="m", timeout=5, max_retries=1, backoff=0.01)
    gens = b.chat([conv("fail500:9"), conv("bad400"), conv("fine")])
    assert gens[0].error and "500" in gens[0].error and gens[0].finish_reason == "error"
    assert stub.counts["fail500:9"] == 2  # one try + one retry
    assert gens[1].error and "400" in gens[1].error and stub.counts["bad400"] == 1  # client errors are not retried
    assert gens[2].ok
    assert b.stats.failures == 2


def test_unreachable_server_is_recorded(server):
    b = OpenAIBackend("http://127.0.0.1:9/v1", model="m", timeout=0.5, max_retries=1, backoff=0.01)
    g = b.chat([conv("x")])[0]
    assert not g.ok and "Connection" in g.error


def test_next_token_logprobs(server):
    stub, url = server
    b = OpenAIBackend(url, model="m")
    lp = b.next_token_logprobs([conv("q")], ["Yes", "No", "Maybe"])[0]
    assert lp["Yes"] == pytest.approx(math.log(0.65))  # " Yes" and "Yes" both count
    assert lp["No"] == pytest.approx(math.log(0.3))
    assert lp["Maybe"] == -math.inf
    assert stub.requests[-1]["top_logprobs"] == 20 and stub.requests[-1]["max_tokens"] == 1


def test_bad_settings():
    with pytest.raises(InputError):
        OpenAIBackend("localhost:8000", model="m")
    with pytest.raises(InputError):
        OpenAIBackend("http://127.0.0.1:8000/v1", model="m", concurrency=0)
