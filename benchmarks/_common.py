"""Helpers shared by the benchmark scripts (imported as ``_common``: each script runs with
``benchmarks/`` first on ``sys.path``)."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path


def machine() -> dict:
    """Where a benchmark ran: platform, CPU, core count, torch threads, Python and the load average at start."""
    import torch

    return {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "load_average_at_start": os.getloadavg()}


def write_json(results: dict, path: Path, **dumps_kw) -> None:
    """``results`` as indented JSON, written atomically (a reader never sees half a file)."""
    from tessera.config import atomic_write_text

    atomic_write_text(path, json.dumps(results, indent=2, **dumps_kw) + "\n")


def package_versions(*packages: str) -> dict:
    """``{package: installed version or None}``, in the order given."""
    import importlib.metadata as md

    out: dict = {}
    for pkg in packages:
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out
