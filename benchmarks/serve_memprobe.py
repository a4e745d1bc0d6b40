"""Run ``tessera`` (normally ``serve``) with a memory probe beside it: where resident memory goes over time.

Usage: python benchmarks/serve_memprobe.py OUT.jsonl [--every 10] [--tracemalloc N] -- serve --port ... (tessera's argv)

Every ``--every`` seconds a thread of the same process appends one JSON line to OUT.jsonl:
- ``rss_mib`` and the resident memory by kind of mapping from ``/proc/self/smaps``: the main heap (``[heap]``),
  anonymous mappings (glibc's thread arenas, large ``malloc`` blocks served by ``mmap``, torch and llama.cpp
  buffers), file-backed mappings (weights read by ``mmap``, shared libraries) and the rest;
- glibc's ``mallinfo2()``: bytes ``malloc`` hands out (``in_use_mib``: ordinary blocks plus ``mmap`` blocks) and
  bytes it holds free (``free_mib``).  A leak grows ``in_use``; fragmentation grows ``free`` and the heap beside it;
- with ``--tracemalloc N`` (frames per trace): the bytes Python's allocator holds (``tracemalloc`` sees Python
  objects and numpy arrays, not what torch or llama.cpp allocate in C).

``SIGUSR1`` takes a sample at once and marks it ``"baseline": true`` (the caller sends it once the server is warm);
with ``--tracemalloc``, it also snapshots Python's allocations.  ``SIGUSR2`` takes a sample marked ``"final":
true`` with, under ``--tracemalloc``, the 12 source lines whose Python allocations grew the most since the
baseline (a snapshot of a few hundred MiB of traces takes seconds, hence only these two).

``benchmarks/serve.py --soak-probe`` starts its soak server through this file and puts the summary in
``serve.json``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import signal
import sys
import threading
import time
from pathlib import Path


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def mallinfo() -> dict | None:
    """glibc's allocator totals in MiB (None off glibc or before 2.33, which lacks ``mallinfo2``)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        fn = libc.mallinfo2
    except (OSError, AttributeError):
        return None
    fn.restype = _MallInfo2
    m = fn()
    mib = 2**20
    return {"in_use_mib": round((m.uordblks + m.hblkhd) / mib, 1), "mmap_blocks_mib": round(m.hblkhd / mib, 1),
            "free_mib": round(m.fordblks / mib, 1), "arena_mib": round(m.arena / mib, 1)}


def smaps() -> dict:
    """Resident MiB by kind of mapping, from ``/proc/self/smaps``."""
    out = {"heap": 0, "anon": 0, "file": 0, "other": 0}
    kind = "other"
    try:
        lines = Path("/proc/self/smaps").read_text().splitlines()
    except OSError:
        return {}
    for line in lines:
        head = line.split(None, 1)[0]
        if not head.endswith(":"):  # a mapping's header: address perms offset dev inode [path]
            parts = line.split()
            path = parts[5] if len(parts) > 5 else ""
            kind = "heap" if path == "[heap]" else "anon" if not path else "file" if path.startswith("/") else "other"
        elif head == "Rss:":
            out[kind] += int(line.split()[1])
    return {k: round(v / 1024, 1) for k, v in out.items()}


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return 0.0


class Probe(threading.Thread):
    def __init__(self, out: Path, every: float, frames: int):
        super().__init__(name="memprobe", daemon=True)
        self.out, self.every, self.frames = out, every, frames
        self.t0, self.first = time.monotonic(), None
        self.mark, self.final, self.wake = threading.Event(), threading.Event(), threading.Event()

    def snapshot(self):
        import tracemalloc

        return tracemalloc.take_snapshot().filter_traces([tracemalloc.Filter(False, tracemalloc.__file__)])

    def sample(self, baseline: bool, final: bool) -> dict:
        rec = {"t_s": round(time.monotonic() - self.t0, 1), "rss_mib": rss_mib(), "smaps_mib": smaps(), "malloc": mallinfo()}
        if self.frames:
            import tracemalloc

            rec["python_traced_mib"] = round(tracemalloc.get_traced_memory()[0] / 2**20, 2)
            if baseline:
                self.first = self.snapshot()
            elif final and self.first is not None:
                rec["python_top_growth"] = [
                    {"where": str(s.traceback[0]), "kib": round(s.size_diff / 1024, 1), "count": s.count_diff}
                    for s in self.snapshot().compare_to(self.first, "lineno")[:12]]
        if baseline:
            rec["baseline"] = True
        if final:
            rec["final"] = True
        return rec

    def run(self) -> None:
        while True:
            baseline, final = self.mark.is_set(), self.final.is_set()
            self.mark.clear()
            self.final.clear()
            self.wake.clear()
            rec = self.sample(baseline, final)
            with self.out.open("a") as f:
                f.write(json.dumps(rec) + "\n")
            self.wake.wait(self.every)


def main() -> None:
    argv = sys.argv[1:]
    if "--" not in argv or not argv or argv[0].startswith("-"):
        sys.exit(__doc__.strip().splitlines()[2])
    mine, rest = argv[: argv.index("--")], argv[argv.index("--") + 1:]
    out, every, frames = Path(mine[0]), 10.0, 0
    for flag, value in zip(mine[1::2], mine[2::2]):
        if flag == "--every":
            every = float(value)
        elif flag == "--tracemalloc":
            frames = int(value)
        else:
            sys.exit(f"error: unknown option {flag}")
    if frames:
        import tracemalloc

        tracemalloc.start(frames)
    out.write_text("")
    probe = Probe(out, every, frames)
    for sig, event in ((signal.SIGUSR1, probe.mark), (signal.SIGUSR2, probe.final)):
        signal.signal(sig, lambda *_, event=event: (event.set(), probe.wake.set()))
    probe.start()
    from tessera.cli import main as tessera_main

    sys.argv = ["tessera", *rest]
    sys.exit(tessera_main())


if __name__ == "__main__":
    main()
