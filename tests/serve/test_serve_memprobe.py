"""The soak's memory tools (benchmarks/serve_memprobe.py, serve.py's floor rule): the probe samples a real
process, stops at its final mark, and the summary reads growth by kind of memory."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import serve as bench  # noqa: E402
import serve_memprobe as probe  # noqa: E402

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc and glibc's mallinfo2")


def test_floor_rule_ignores_swings_and_sees_a_rising_floor():
    swings = [(t, 1000 + (200 if t % 20 == 10 else 0)) for t in range(0, 601, 10)]  # load spikes, flat floor
    assert bench.floor_growth(swings) == 0
    creep = [(t, 1000 + t / 10 + (150 if t % 20 == 10 else 0)) for t in range(0, 601, 10)]  # +60 MiB floor
    assert bench.floor_growth(creep) == pytest.approx(60 - 0, abs=12.1)
    assert bench.floor_growth([(0, 5.0)]) is None


def test_probe_measures_this_process():
    m, sm = probe.mallinfo(), probe.smaps()
    assert m is not None and m["in_use_mib"] > 0 and m["mmap_blocks_mib"] >= 0
    assert sm["file"] > 0 and probe.rss_mib() >= sm["heap"]
    block = bytearray(64 * 2**20)  # 64 MiB from malloc (mmap or the heap's free top): in use either way
    assert probe.mallinfo()["in_use_mib"] >= m["in_use_mib"] + 60
    del block


def test_probe_runs_a_command_and_marks_baseline_and_final(tmp_path):
    out = tmp_path / "probe.jsonl"
    script = str(ROOT / "benchmarks" / "serve_memprobe.py")
    # the probe around a stand-in for tessera's main that sleeps 4 s (its own sampling is what this checks)
    code = (f"import runpy, sys, time; sys.argv = [{script!r}, {str(out)!r}, '--every', '0.2', '--tracemalloc', '1', "
            "'--', 'serve']; import tessera.cli as c; c.main = lambda: time.sleep(4); "
            "runpy.run_path(sys.argv[0], run_name='__main__')")
    p = subprocess.Popen([sys.executable, "-c", code])
    try:
        time.sleep(1.5)
        p.send_signal(signal.SIGUSR1)
        time.sleep(0.5)
        p.send_signal(signal.SIGUSR2)
        assert p.wait(30) == 0
    finally:
        p.kill()
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert sum(r.get("baseline", False) for r in recs) == 1 and sum(r.get("final", False) for r in recs) == 1
    final = next(r for r in recs if r.get("final"))
    assert isinstance(final["python_top_growth"], list) and final["python_traced_mib"] > 0
    summary = bench.probe_summary(out)
    assert summary["end"]["final"] and summary["baseline"]["baseline"]
    assert set(summary["growth_mib"]) >= {"rss", "smaps_heap", "smaps_anon", "malloc_in_use", "malloc_mmap_blocks"}
