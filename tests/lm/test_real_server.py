"""A real OpenAI-compatible server: llama.cpp's own (``python -m tessera.lm.llamacpp_server``: ``llama_cpp.server``
loading the weights as tessera does) on the embedded GGUF, and
tessera's ``--lm-url`` paths against it (``retrieval synth``, ``ask``, ``serve``).  The stub-server tests in
test_openai_backend.py stay for fast runs; this module skips where llama-cpp-python[server] is not installed."""

from __future__ import annotations

import importlib.util
import json
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from tessera_testing import run_cli

SERVER_DEPS = ("llama_cpp", "fastapi", "uvicorn", "sse_starlette", "starlette_context", "pydantic_settings")
missing = [m for m in SERVER_DEPS if importlib.util.find_spec(m) is None]
pytestmark = pytest.mark.skipif(bool(missing), reason=f"llama.cpp's server needs {', '.join(missing)} "
                                "(pip install 'llama-cpp-python[server]'; make install builds it)")

QUESTION = "How do I give a function parameter a default value?"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server_url(embedded_lm_dir, tmp_path_factory):
    from tessera import hub
    from tessera.lm.llamacpp import run_file

    port = _free_port()
    log = tmp_path_factory.mktemp("llama_server") / "server.log"
    gguf = run_file(hub.embedded_lm_gguf())  # the file the local llama.cpp engine runs
    with open(log, "w") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "tessera.lm.llamacpp_server", "--model", str(gguf), "--host", "127.0.0.1",
                                 "--port", str(port), "--n_ctx", "4096", "--n_threads", "2", "--n_threads_batch", "2",
                                 "--flash_attn", "true"],  # as tessera's engine runs it: the same numerics
                                stdout=fh, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(f"llama_cpp.server exited with {proc.returncode}: {log.read_text()[-800:]}")
            try:
                with urllib.request.urlopen(f"{url}/models", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"llama_cpp.server did not answer in 120 s: {log.read_text()[-800:]}")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_ask_streams_from_the_server_and_matches_the_local_engine(server_url):
    """Greedy, same GGUF file and settings, same prompt ids: the server's answer is the local llama.cpp engine's."""
    r = run_cli("--quiet", "ask", QUESTION, "--lm-url", server_url, "--json", "--max-new-tokens", "48")
    assert r.returncode == 0, r.stderr
    remote = json.loads(r.stdout)
    assert remote["answer"] and remote["stats"]["new_tokens"] > 0 and remote["sources"]
    assert remote["model"].endswith(server_url)
    local = run_cli("--quiet", "ask", QUESTION, "--engine", "llamacpp", "--json", "--max-new-tokens", "48")
    assert local.returncode == 0, local.stderr
    assert json.loads(local.stdout)["answer"] == remote["answer"]


def test_ask_against_a_dead_server_says_what_to_check():
    r = run_cli("--quiet", "ask", QUESTION, "--lm-url", f"http://127.0.0.1:{_free_port()}/v1", "--max-new-tokens", "8")
    assert r.returncode == 2 and "--lm-url" in r.stderr and "Traceback" not in r.stderr


def test_retrieval_synth_against_the_server(server_url, tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    texts = {
        "kettle": "A kettle heats water by passing current through a coiled element at its base. " * 6,
        "tides": "Tides rise and fall twice a day because the moon's gravity pulls the oceans toward it. " * 6,
    }
    for name, text in texts.items():
        (folder / f"{name}.txt").write_text(text)
    out = tmp_path / "rows.jsonl"
    r = run_cli("retrieval", "synth", "--corpus", str(folder), "--out", str(out), "--lm-url", server_url,
                "--hq-tokens", "96", "--seed", "1", "--min-words", "10", "--concurrency", "2")
    assert r.returncode == 0, r.stderr
    stats = json.loads(out.with_name(out.name + ".stats.json").read_text()) if out.with_name(out.name + ".stats.json").exists() \
        else json.loads(next(tmp_path.glob("rows*.stats.json")).read_text())
    assert stats["rows"] + stats["failures"] == 2
    assert stats["backend"]["conversations"] >= 2 and stats["backend"]["failures"] == 0  # every request answered
    assert stats["backend"]["new_tokens"] > 0


def test_serve_answers_from_the_server(server_url, tmp_path):
    from fastapi.testclient import TestClient

    from tessera.serve import ServeConfig, create_app

    docs = tmp_path / "corpus"
    docs.mkdir()
    (docs / "tea.md").write_text("# Green tea\n\nGreen tea is steeped at 70 to 80 degrees Celsius for two to three minutes.\n")
    cfg = ServeConfig(lm="default", lm_url=server_url, corpora=[str(docs)], encoder=None,
                      upload_dir=str(tmp_path / "uploads"), max_new_tokens=24)
    with TestClient(create_app(cfg)) as client:
        assert client.get("/healthz").json()["engine"] == "openai"
        r = client.post("/v1/ask", json={"question": "At what temperature is green tea steeped?", "k": 1})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["answer"] and body["sources"][0]["doc_id"].startswith("tea")
