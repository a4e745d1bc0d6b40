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
