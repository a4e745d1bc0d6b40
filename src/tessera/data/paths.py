"""Where the shared evaluation data lives (``../shared/data`` next to the repo)."""

from __future__ import annotations

import os
from pathlib import Path


def shared_data_dir() -> Path | None:
    """The shared data folder, or ``None`` when it is absent.

    Order: ``$TESSERA_SHARED_DATA`` (if set, and only it); ``<repo root>/../shared/data``
    with the repo root found from this file (``src/tessera/data/paths.py``);
    ``<cwd>/../shared/data``.
    """
    env = os.environ.get("TESSERA_SHARED_DATA")
    if env:
        p = Path(env).expanduser()
        return p if p.is_dir() else None
    repo_root = Path(__file__).resolve().parents[3]
    for p in (repo_root.parent / "shared" / "data", Path.cwd().parent / "shared" / "data"):
        if p.is_dir():
            return p
    return None
