"""Load benchmark of ``tessera serve``: bounded concurrent clients against the real server process.

The server is started as ``tessera serve`` in a subprocess on 127.0.0.1 with the
embedded defaults (SmolLM2-135M-Instruct, the Python docs corpus, BM25), its torch
threads set with ``--threads`` (OMP_NUM_THREADS), ``--encoder none`` so no background
dense-index build competes with the measured requests.  This process is the client:
for each concurrency level (default 1, 4 and 16 clients) a fixed number of
``POST /v1/ask`` requests (greedy, k=3, ``--max-new-tokens`` 16, questions rotated
from a list) is sent by that many threads.  A client answered ``429`` waits the
``Retry-After`` it was given (at most ``--max-retry-wait`` s) and retries the same
request; each 429 is counted.  Any other non-200 answer is an error (the goal is zero).

Figures per level: completed requests, wall time, throughput (requests/s and new
tokens/s), latency of the accepted attempt (queue wait included) p50/p95/p99/max,
end-to-end latency including 429 retries, 429 count, other errors, the server's RSS
(resident memory, sampled every 0.25 s with psutil) at start / peak / end, the
server-reported queue wait and time inside ``ask``, and the HTTP overhead (client
latency minus the server's own total).  Peer: the same requests answered in-process
by ``tessera.ask.ask`` (no HTTP, no queue), sequentially, once before the server
starts and once after it stops (load on a shared machine drifts; the two bracket the
server run); reported as the ratio of server latency at concurrency 1 to in-process
latency.

Bounded: every level has a deadline (``--level-timeout``) and the whole run one
(``--max-minutes``); the server is stopped at the end in every case.

Usage: python benchmarks/serve.py [--levels 1,4,16] [--requests 6,16,32] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from _common import package_versions

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = [
    "How do I give a function parameter a default value?",
    "What does the with statement do?",
    "What is a lambda expression?",
    "How are exceptions raised and caught?",
    "What does the global statement do?",
    "How do decorators work?",
    "How do I write a for loop over a list?",
    "What is the difference between a list and a tuple?",
]


def machine(threads: int) -> dict:
    versions = package_versions("torch", "transformers", "fastapi", "uvicorn", "starlette", "httpx", "tessera")
    return {"platform": platform.platform(), "python": platform.python_version(),
            "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(), "server_torch_threads": threads,
            "load_average_at_start": list(os.getloadavg()), "versions": versions}


def percentile(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    i = (len(xs) - 1) * q / 100
    lo, hi = int(i), min(int(i) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (i - lo)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RssSampler:
    """Samples a process's resident memory (MiB) every ``interval`` s in a thread."""

    def __init__(self, pid: int, interval: float = 0.25):
        import psutil

        self.proc, self.interval, self.samples = psutil.Process(pid), interval, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            try:
                self.samples.append((time.monotonic(), self.proc.memory_info().rss / 2**20))
            except Exception:  # noqa: BLE001 - the process ended
                return
            self._stop.wait(self.interval)

    def start(self):
        self._thread.start()
        return self

    def stop(self):
        self._stop.set()
        self._thread.join(2)

    def window(self, t0: float, t1: float) -> dict:
        xs = [r for t, r in self.samples if t0 <= t <= t1] or [self.samples[-1][1]]
        return {"start_mib": round(xs[0], 1), "peak_mib": round(max(xs), 1), "end_mib": round(xs[-1], 1), "samples": len(xs)}


def run_level(base: str, concurrency: int, n_requests: int, body: dict, deadline_s: float, max_retry_wait: float) -> dict:
    import httpx

    lock = threading.Lock()
    tickets = list(range(n_requests))
    ok, e2e, queue_s, new_tokens, errors, server_s, overhead = [], [], [], [], [], [], []
    rejected = 0
    stop_at = time.monotonic() + deadline_s

    def client(cid: int):
        nonlocal rejected
        with httpx.Client(base_url=base, timeout=httpx.Timeout(deadline_s)) as c:
            while True:
                with lock:
                    if not tickets:
                        return
                    i = tickets.pop(0)
                req = {**body, "question": QUESTIONS[i % len(QUESTIONS)]}
                first = time.monotonic()
                while time.monotonic() < stop_at:
                    t = time.monotonic()
                    try:
                        r = c.post("/v1/ask", json=req)
                    except httpx.HTTPError as e:
                        with lock:
                            errors.append(f"{type(e).__name__}: {e}")
                        break
                    if r.status_code == 429:
                        with lock:
                            rejected += 1
                        time.sleep(min(max_retry_wait, float(r.headers.get("Retry-After", "1"))))
                        continue
                    if r.status_code != 200:
                        with lock:
                            errors.append(f"{r.status_code}: {r.text[:200]}")
                        break
                    out = r.json()
                    took = time.monotonic() - t
                    with lock:
                        ok.append(took)
                        server_s.append(out["timings"]["total_s"] - out["timings"]["queue_s"])
                        overhead.append(took - out["timings"]["total_s"])
                        e2e.append(time.monotonic() - first)
                        queue_s.append(out["timings"]["queue_s"])
                        new_tokens.append(out["new_tokens"])
                    break
                else:
                    with lock:
                        errors.append("client deadline reached")
                    return

    t0 = time.monotonic()
    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(concurrency)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(max(1.0, stop_at - time.monotonic() + 5))
    wall = time.monotonic() - t0
    r3 = lambda x: None if x is None else round(x, 3)  # noqa: E731
    return {
        "concurrency": concurrency, "requests": n_requests, "completed": len(ok), "wall_s": round(wall, 2),
        "throughput_rps": round(len(ok) / wall, 4), "new_tokens_per_s": round(sum(new_tokens) / wall, 2),
        "latency_s": {"p50": r3(percentile(ok, 50)), "p95": r3(percentile(ok, 95)), "p99": r3(percentile(ok, 99)),
                      "mean": r3(statistics.fmean(ok)) if ok else None, "max": r3(max(ok)) if ok else None},
        "end_to_end_s": {"p50": r3(percentile(e2e, 50)), "p95": r3(percentile(e2e, 95)), "p99": r3(percentile(e2e, 99))},
        "server_queue_s": {"p50": r3(percentile(queue_s, 50)), "p95": r3(percentile(queue_s, 95))},
        "server_ask_s": {"p50": r3(percentile(server_s, 50)), "mean": r3(statistics.fmean(server_s)) if server_s else None},
        "http_overhead_s": {"p50": r3(percentile(overhead, 50)), "max": r3(max(overhead)) if overhead else None},
        "rejected_429": rejected, "other_errors": len(errors), "error_samples": errors[:5],
        "mean_new_tokens": round(statistics.fmean(new_tokens), 2) if new_tokens else None,
        "_t": (t0, t0 + wall),
    }


def in_process_peer(args, n: int) -> dict:
    """The same asks answered by tessera.ask.ask in this process (no HTTP, no queue), sequentially."""
    import torch

    torch.set_num_threads(args.threads)
    from tessera.ask import ask
    from tessera.lm import LocalLM
    from tessera.retrieval.corpus_index import CorpusIndex

    lm, index = LocalLM.load(args.lm), CorpusIndex.open("python-docs")
    ask(QUESTIONS[0], corpus=index, lm=lm, k=args.k, max_new_tokens=args.max_new_tokens)  # warm-up
    lat = []
    for i in range(n):
        t = time.monotonic()
        ask(QUESTIONS[i % len(QUESTIONS)], corpus=index, lm=lm, k=args.k, max_new_tokens=args.max_new_tokens)
        lat.append(time.monotonic() - t)
    return {"requests": n, "latency_s": {"p50": round(percentile(lat, 50), 3), "mean": round(statistics.fmean(lat), 3)}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--levels", default="1,4,16", help="concurrent clients per level")
    ap.add_argument("--requests", default="6,16,32", help="requests per level (one number or one per level)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the server (OMP_NUM_THREADS)")
    ap.add_argument("--lm", default="default")
    ap.add_argument("--queue-size", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--request-timeout", type=float, default=300.0)
    ap.add_argument("--level-timeout", type=float, default=600.0)
    ap.add_argument("--max-retry-wait", type=float, default=5.0)
    ap.add_argument("--max-minutes", type=float, default=30.0)
    ap.add_argument("--peer-requests", type=int, default=6)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "serve.json"))
    args = ap.parse_args()
    import httpx

    levels = [int(x) for x in args.levels.split(",")]
    counts = [int(x) for x in args.requests.split(",")]
    counts = counts * len(levels) if len(counts) == 1 else counts
    if len(counts) != len(levels):
        sys.exit("error: --requests needs one number or one per level")
    run_deadline = time.monotonic() + args.max_minutes * 60
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads), "TESSERA_QUIET": "1"}
    cmd = [sys.executable, "-m", "tessera.cli", "--quiet", "serve", "--host", "127.0.0.1", "--port", str(port),
           "--lm", args.lm, "--encoder", "none", "--queue-size", str(args.queue_size),
           "--max-new-tokens", str(args.max_new_tokens), "--timeout", str(args.request_timeout)]
    info = machine(args.threads)
    peer_before = None
    if args.peer_requests > 0:
        print("in-process peer (before the server) ...", flush=True)
        peer_before = in_process_peer(args, args.peer_requests)
    log_path = Path(tempfile.gettempdir()) / f"tessera-serve-bench-{os.getpid()}.log"  # the server's own output
    server = subprocess.Popen(cmd, env=env, stdout=open(log_path, "w"), stderr=subprocess.STDOUT, cwd=ROOT)
    results: dict = {"benchmark": "serve", "machine": info, "server_command": " ".join(cmd[1:]),
                     "config": {k: v for k, v in vars(args).items() if k != "out"}, "levels": []}
    sampler = None
    try:
        t_start = time.monotonic()
        while True:
            if server.poll() is not None:
                raise SystemExit(f"error: the server exited ({server.returncode}); see {log_path}")
            try:
                h = httpx.get(base + "/healthz", timeout=2).json()
                break
            except httpx.HTTPError:
                if time.monotonic() - t_start > 600:
                    raise SystemExit("error: the server did not come up in 600 s") from None
                time.sleep(0.5)
        results["startup_s"] = round(time.monotonic() - t_start, 2)
        results["health"] = h
        sampler = RssSampler(server.pid).start()
        body = {"k": args.k, "max_new_tokens": args.max_new_tokens, "decode": "greedy", "cite": False}
        warm = httpx.post(base + "/v1/ask", json={**body, "question": QUESTIONS[0]}, timeout=args.request_timeout)
        warm.raise_for_status()
        results["warmup_s"] = round(warm.json()["timings"]["total_s"], 3)
        for c, n in zip(levels, counts):
            left = run_deadline - time.monotonic()
            if left < 30:
                results["levels"].append({"concurrency": c, "skipped": "run deadline (--max-minutes) reached"})
                continue
            print(f"level {c} clients x {n} requests ...", flush=True)
            res = run_level(base, c, n, body, min(args.level_timeout, left), args.max_retry_wait)
            t0, t1 = res.pop("_t")
            res["server_rss"] = sampler.window(t0, t1)
            results["levels"].append(res)
            print(json.dumps(res), flush=True)
        results["server_rss_overall"] = sampler.window(0, time.monotonic())
    finally:
        if sampler is not None:
            sampler.stop()
        server.send_signal(signal.SIGINT)
        try:
            server.wait(20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(10)

    if peer_before is not None:
        results["peer_in_process"] = {"before_server": peer_before}
        if time.monotonic() < run_deadline - 60:
            print("in-process peer (after the server) ...", flush=True)
            results["peer_in_process"]["after_server"] = in_process_peer(args, args.peer_requests)
        runs = list(results["peer_in_process"].values())
        results["peer_in_process"]["latency_p50_s"] = round(statistics.fmean(r["latency_s"]["p50"] for r in runs), 3)
    done = [lv for lv in results["levels"] if "completed" in lv]
    by_c = {lv["concurrency"]: lv for lv in done}
    figures = {}
    if 1 in by_c and "peer_in_process" in results:
        figures["server_over_in_process_latency_p50"] = round(by_c[1]["latency_s"]["p50"] / results["peer_in_process"]["latency_p50_s"], 3)
    if 1 in by_c:
        figures["http_overhead_s_p50_at_1_client"] = by_c[1]["http_overhead_s"]["p50"]
    if len(done) >= 2:
        figures["throughput_ratio_max_over_min_concurrency"] = round(done[-1]["throughput_rps"] / done[0]["throughput_rps"], 3)
    peak = max((lv["server_rss"]["peak_mib"] for lv in done), default=None)
    start = done[0]["server_rss"]["start_mib"] if done else None
    figures["rss_growth_mib"] = round(peak - start, 1) if done else None
    results["figures"] = figures
    results["machine"]["load_average_at_end"] = list(os.getloadavg())
    results["goals"] = {
        "all_levels_completed": {"met": all(lv.get("completed") == lv.get("requests") for lv in results["levels"])},
        "zero_errors_other_than_429": {"met": all(lv.get("other_errors", 1) == 0 for lv in results["levels"]),
                                       "errors": sum(lv.get("other_errors", 0) for lv in done)},
        "queue_bounded_429_when_full": {
            "met": any(lv["rejected_429"] > 0 for lv in done if lv["concurrency"] > args.queue_size + 1)
            if any(lv["concurrency"] > args.queue_size + 1 for lv in done) else None,
            "rejected_429": {lv["concurrency"]: lv["rejected_429"] for lv in done},
            "note": f"capacity is 1 running + {args.queue_size} queued; more concurrent clients than that must see 429s"},
        "memory_bounded": {"met": figures["rss_growth_mib"] is not None and figures["rss_growth_mib"] < 256,
                           "rss_growth_mib": figures["rss_growth_mib"], "threshold_mib": 256},
    }
    out = Path(args.out)
    from tessera.config import atomic_write_text

    atomic_write_text(out, json.dumps(results, indent=2) + "\n")
    print(json.dumps({"figures": figures, "goals": results["goals"]}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
