"""``tessera serve`` from the command line: help, bad options (exit 2, one line), the real server process."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest

from tessera_testing import run_cli


def test_serve_help_lists_the_options():
    r = run_cli("serve", "--help")
    assert r.returncode == 0, r.stderr
    for opt in ("--host", "--port", "--corpus", "--lm", "--queue-size", "--timeout"):
        assert opt in r.stdout


@pytest.mark.parametrize("args,needle", [
    (["--port", "70000"], "--port must be 0..65535"),
    (["--corpus", "/no/such/corpus-folder"], "not found"),
    (["--queue-size", "-1"], "queue_size must be 0 or more"),
    (["--max-upload-files", "5000"], "--max-upload-files must be at most 1000"),
])
def test_bad_options_fail_with_one_line(args, needle, tiny_lm_dir):
    r = run_cli("serve", "--lm", str(tiny_lm_dir), *args)
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], r.stderr


def test_serve_process_answers_on_localhost(tiny_lm_dir, small_corpus_dir, tmp_path):
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "TESSERA_HOME": os.environ["TESSERA_HOME"]}
    proc = subprocess.Popen([sys.executable, "-m", "tessera.cli", "--quiet", "serve", "--port", str(port), "--lm", str(tiny_lm_dir),
                             "--corpus", str(small_corpus_dir), "--encoder", "none", "--max-new-tokens", "4"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        base = f"http://127.0.0.1:{port}"
        t = time.monotonic()
        while True:
            assert proc.poll() is None, proc.communicate()
            try:
                health = httpx.get(base + "/healthz", timeout=1).json()
                break
            except httpx.HTTPError:
                assert time.monotonic() - t < 120, "the server did not start"
                time.sleep(0.2)
        assert health["model"] == str(tiny_lm_dir) and health["corpora"] == 1
        r = httpx.post(base + "/v1/ask", json={"question": "how hot is green tea steeped"}, timeout=60)
        assert r.status_code == 200 and r.json()["sources"][0]["doc_id"] == "tea.md"
        # bound to the loopback interface only (the default)
        assert proc.poll() is None
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=30)
    assert f"http://127.0.0.1:{port}/" in out


_PROBE = """
import os, sys
import tessera.serve.app as app
seen = {}
app.serve = lambda cfg, lm=None: seen.update(mkl=os.environ.get("MKL_DISABLE_FAST_MM"), torch="torch" in sys.modules)
from typer.testing import CliRunner
from tessera.cli import app as cli
r = CliRunner().invoke(cli, ["serve", "--port", "0"])
assert r.exit_code == 0, r.output
print(seen["mkl"], seen["torch"])
"""


@pytest.mark.parametrize("preset,expected", [(None, "1"), ("0", "0")])
def test_serve_turns_off_mkl_buffer_pools_before_torch_loads(preset, expected):
    """MKL's per-thread buffer pools grew the soak's live memory by 190 MiB; MKL reads MKL_DISABLE_FAST_MM when
    torch loads it, so ``tessera serve`` sets it (unless the user did) before anything imports torch."""
    env = {k: v for k, v in os.environ.items() if k != "MKL_DISABLE_FAST_MM"}
    if preset is not None:
        env["MKL_DISABLE_FAST_MM"] = preset
    r = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [expected, "False"]


def test_mkl_setting_reports_when_torch_came_first():
    code = ("import os, torch; from tessera.serve.engine import disable_mkl_buffer_pools as d; "
            "print(d(), os.environ['MKL_DISABLE_FAST_MM'])")
    env = {k: v for k, v in os.environ.items() if k != "MKL_DISABLE_FAST_MM"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["False", "1"]
