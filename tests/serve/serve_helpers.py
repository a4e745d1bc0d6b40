"""Helpers of the serve tests (a module of its own, see tests/tessera_testing.py)."""

from __future__ import annotations

import json


def sse_events(text: str) -> list[tuple[str, dict]]:
    """``event: X`` / ``data: {...}`` blocks of a server-sent-events body (pings skipped)."""
    out = []
    for block in text.split("\n\n"):
        event, data = None, ""
        for line in block.split("\n"):
            if line.startswith("event:"):
                event = line[6:].strip()
            elif line.startswith("data:"):
                data += line[5:].strip()
        if event:
            out.append((event, json.loads(data)))
    return out
