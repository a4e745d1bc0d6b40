"""Helpers of the serve tests (a module of its own, see tests/tessera_testing.py)."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time


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


@contextlib.contextmanager
def uvicorn_thread(app, **config):
    """``app`` served by uvicorn on a free 127.0.0.1 port in a thread -> ``(url, port, server, thread)``; stopped on exit."""
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, **{"log_level": "warning", **config}))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    t = time.monotonic()
    while not server.started:
        if time.monotonic() - t > 20 or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}", port, server, thread
    finally:
        server.should_exit = True
        thread.join(10)
