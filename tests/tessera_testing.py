"""Helpers shared by test modules (a module of its own: conftest.py files in subfolders would shadow a name imported from `conftest`)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest


def run_cli(*args: str, env: dict | None = None, cwd: str | Path | None = None, timeout: int = 600):
    """Run ``python -m tessera.cli ARGS`` in a subprocess; returns CompletedProcess (text)."""
    import subprocess

    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "tessera.cli", *args], capture_output=True, text=True,
                          env=full_env, cwd=cwd, timeout=timeout)


def shared_data_or_skip(*parts: str) -> Path:
    from tessera.data.paths import shared_data_dir

    root = shared_data_dir()
    if root is None or not root.joinpath(*parts).exists():
        pytest.skip(f"../shared/data/{'/'.join(parts)} not found (the shared evaluation data is absent)")
    return root.joinpath(*parts)


@pytest.fixture(autouse=True)
def one_torch_thread():
    """One torch thread for tiny models: on a shared 2-core machine more threads only oversubscribe.
    Autouse only where a ``conftest.py`` imports it (tests/models, tests/train)."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def run_torchrun(script: str | Path, *args: str, nproc: int = 2, timeout: int = 180, env: dict | None = None,
                 retries: int = 1) -> None:
    """``torchrun --nproc_per_node NPROC SCRIPT ARGS`` on a free local port (one OMP thread per worker,
    no inherited RANK/WORLD_SIZE/...); fails the test on a non-zero exit or past ``timeout`` seconds.
    A run that hangs (a gloo rendezvous that never completes, seen once in ~20 CI runs) is killed and
    retried ``retries`` times on a fresh port before the test fails."""
    import signal
    import socket
    import subprocess

    with socket.socket() as sock:  # a free port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        full_env.pop(k, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1",
           "--master_port", str(port), str(script), *map(str, args)]
    # own session: on a timeout the launcher *and* its workers are killed
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full_env, start_new_session=True)
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        try:  # torchrun may start workers in sessions of their own: kill every descendant, then the group
            import psutil

            kids = psutil.Process(proc.pid).children(recursive=True)
        except Exception:
            kids = []
        for kid in kids:
            try:
                kid.kill()
            except Exception:
                pass
        os.killpg(proc.pid, signal.SIGKILL)
        try:
            proc.communicate(timeout=30)  # never wait forever on a pipe an orphaned worker still holds
        except subprocess.TimeoutExpired:
            pass
        if retries > 0:
            return run_torchrun(script, *args, nproc=nproc, timeout=timeout, env=env, retries=retries - 1)
        pytest.fail(f"the {nproc}-process torchrun did not finish in {timeout} s")
    assert proc.returncode == 0, err[-3000:]


def lines_at_least(path: str | Path, n: int):
    """A ``kill_midway`` trigger: ``path`` holds at least ``n`` lines."""
    path = Path(path)

    def ready() -> bool:
        try:
            return path.read_bytes().count(b"\n") >= n
        except FileNotFoundError:
            return False

    return ready


def kill_midway(args: list[str], when, timeout: float = 180) -> None:
    """Run ``python -m tessera.cli ARGS`` as a child and ``kill -9`` it as soon as ``when()`` is true
    (a moment in the middle of its work).  Fails the test when the child ends on its own first
    (the kill would prove nothing)."""
    import signal
    import subprocess
    import time

    proc = subprocess.Popen([sys.executable, "-m", "tessera.cli", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env=os.environ.copy())
    deadline = time.monotonic() + timeout
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            if when():
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                return
            time.sleep(0.002)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err = proc.stderr.read().decode(errors="replace")[-1500:] if proc.stderr else ""
    raise AssertionError(f"the child ended (rc {proc.returncode}) before the moment to kill it: {err}")
