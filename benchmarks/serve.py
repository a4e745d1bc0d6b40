"""Load benchmark of ``tessera serve``: concurrent clients against the real server process, one request at a
time (``--max-batch 1``) against continuous batching (``--max-batch 4``), then a soak.

Each server is started as ``tessera serve`` in a subprocess on 127.0.0.1 with the embedded defaults
(SmolLM2-135M-Instruct on llama.cpp, the Python docs corpus, BM25; ``--encoder none`` so no background
dense-index build competes).  This process is the client: for each concurrency level (default 1, 4 and 16
clients) a fixed number of ``POST /v1/ask`` requests (greedy, k=3, ``--max-new-tokens`` 64, questions rotated
from a list) is sent by that many threads.  A client answered ``429`` waits the ``Retry-After`` it was given (at
most ``--max-retry-wait`` s) and retries; each 429 is counted.  Any other non-200 answer is an error.

Figures per level: completed requests, wall time, throughput (requests/s and new tokens/s), latency of the
accepted attempt (queue wait included) p50/p95/p99/max, end-to-end latency including 429 retries, 429 count,
other errors, the server's RSS, its queue wait and time inside ``ask``, the HTTP overhead.  The batch loop's
counters (steps, mean decoding rows) come from ``/healthz``.  ``decode_profile``: one decoding step's time by
rows in the batch and prompt tokens/s, in process: the ceiling of what batching can give on this CPU.
Peer: the same asks answered in-process by ``tessera.ask.ask`` (no HTTP, no queue).

``--soak S``: S seconds (default 600) of mixed traffic at the batched setting (1-6 clients: JSON and SSE asks,
streams dropped mid-answer, citations, health checks), resident memory and open file descriptors sampled every
10 s; the server runs under ``serve_memprobe.py`` (``--no-soak-probe``: not), which records where its memory is
(smaps by kind, glibc's live and free bytes).  RSS growth is the floor rule (``FLOOR_RULE``).  ``--soak-only``:
the soak alone, to ``serve-soak.json``.  ``--quick``: levels 1 and 4, a 60 s soak, no peer.

Goals (``serve.json`` ``goals``): ``serve_4_clients_throughput_ratio`` >= 3, ``serve_p50_ratio_4_clients`` <= 1.5,
``serve_16_clients_errors`` <= 0, ``soak_rss_growth_mb`` <= 50, ``soak_fd_growth`` <= 5.

Usage: python benchmarks/serve.py [--quick] [--levels 1,4,16] [--requests 6,16,32] [--max-batches 1,4] [--soak 600]
"""

from __future__ import annotations

import argparse
import collections
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
    ok, e2e, queue_s, new_tokens, errors, server_s, overhead, prompt_tokens, ttft = [], [], [], [], [], [], [], [], []
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
                        prompt_tokens.append(out["prompt_tokens"])
                        tm = out["timings"]
                        ttft.append(tm["queue_s"] + tm["retrieve_s"] + tm["time_to_first_token_s"])
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
        "time_to_first_token_s": {"p50": r3(percentile(ttft, 50)), "p95": r3(percentile(ttft, 95))},
        "server_queue_s": {"p50": r3(percentile(queue_s, 50)), "p95": r3(percentile(queue_s, 95))},
        "server_ask_s": {"p50": r3(percentile(server_s, 50)), "mean": r3(statistics.fmean(server_s)) if server_s else None},
        "http_overhead_s": {"p50": r3(percentile(overhead, 50)), "max": r3(max(overhead)) if overhead else None},
        "rejected_429": rejected, "other_errors": len(errors), "error_samples": errors[:5],
        "mean_new_tokens": round(statistics.fmean(new_tokens), 2) if new_tokens else None,
        "mean_prompt_tokens": round(statistics.fmean(prompt_tokens), 1) if prompt_tokens else None,
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


class Server:
    """``tessera serve`` in a subprocess (``--max-batch N``), up and warmed; stopped on exit."""

    def __init__(self, args, max_batch: int, probe: Path | None = None):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        # with ``probe``: through serve_memprobe.py, which writes where resident memory goes to that JSONL file
        launch = ([sys.executable, str(ROOT / "benchmarks" / "serve_memprobe.py"), str(probe), "--tracemalloc",
                   str(args.soak_tracemalloc), "--"] if probe else [sys.executable, "-m", "tessera.cli"])
        self.cmd = [*launch, "--quiet", "serve", "--host", "127.0.0.1", "--port",
                    str(self.port), "--lm", args.lm, "--encoder", "none", "--queue-size", str(args.queue_size),
                    "--max-new-tokens", str(args.max_new_tokens), "--timeout", str(args.request_timeout),
                    "--max-batch", str(max_batch)]
        self.env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
                    "TESSERA_QUIET": "1"}
        self.log = Path(tempfile.gettempdir()) / f"tessera-serve-bench-{os.getpid()}-{max_batch}.log"
        self.args, self.proc, self.sampler = args, None, None

    def __enter__(self):
        import httpx

        self.proc = subprocess.Popen(self.cmd, env=self.env, stdout=open(self.log, "w"), stderr=subprocess.STDOUT, cwd=ROOT)
        t0 = time.monotonic()
        while True:
            if self.proc.poll() is not None:
                raise SystemExit(f"error: the server exited ({self.proc.returncode}); see {self.log}")
            try:
                self.health = httpx.get(self.base + "/healthz", timeout=2).json()
                break
            except httpx.HTTPError:
                if time.monotonic() - t0 > 600:
                    raise SystemExit("error: the server did not come up in 600 s") from None
                time.sleep(0.5)
        self.startup_s = round(time.monotonic() - t0, 2)
        self.sampler = RssSampler(self.proc.pid).start()
        return self

    def healthz(self) -> dict:
        import httpx

        return httpx.get(self.base + "/healthz", timeout=10).json()

    def __exit__(self, *exc):
        if self.sampler is not None:
            self.sampler.stop()
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


def run_server(args, max_batch: int, levels: list[int], counts: list[int], run_deadline: float,
               body: dict | None = None) -> dict:
    """The concurrency levels against one server started with ``--max-batch max_batch``."""
    import httpx

    body = body or {"k": args.k, "max_new_tokens": args.max_new_tokens, "decode": "greedy", "cite": False}
    with Server(args, max_batch) as srv:
        out = {"max_batch": max_batch, "server_command": " ".join(srv.cmd[1:]), "startup_s": srv.startup_s,
               "health": srv.health, "levels": []}
        warm = httpx.post(srv.base + "/v1/ask", json={**body, "question": QUESTIONS[0]}, timeout=args.request_timeout)
        warm.raise_for_status()
        out["warmup_s"] = round(warm.json()["timings"]["total_s"], 3)
        for c, n in zip(levels, counts):
            left = run_deadline - time.monotonic()
            if left < 30:
                out["levels"].append({"concurrency": c, "skipped": "run deadline (--max-minutes) reached"})
                continue
            print(f"--max-batch {max_batch}: {c} clients x {n} requests ...", flush=True)
            res = run_level(srv.base, c, n, body, min(args.level_timeout, left), args.max_retry_wait)
            t0, t1 = res.pop("_t")
            res["server_rss"] = srv.sampler.window(t0, t1)
            out["levels"].append(res)
            print(json.dumps({k: res[k] for k in ("concurrency", "completed", "throughput_rps", "latency_s",
                                                   "rejected_429", "other_errors")}), flush=True)
        out["batching_after"] = srv.healthz().get("batching")
        out["server_rss_overall"] = srv.sampler.window(0, time.monotonic())
    return out


def soak(args, max_batch: int, seconds: float) -> dict:
    """Mixed traffic for ``seconds``: 1-6 clients asking (JSON and SSE, some streams dropped mid-answer, citations
    now and then, k 0-3), health checks and corpus listings; resident memory and open file descriptors of the
    server sampled every 10 s after every path has run once (the first citation loads the transformers model)."""
    import random

    import httpx
    import psutil

    rng = random.Random(0)
    counts = collections.Counter()
    samples: list[dict] = []
    probe = Path(tempfile.gettempdir()) / f"tessera-serve-memprobe-{os.getpid()}.jsonl" if args.soak_probe else None
    with Server(args, max_batch, probe) as srv:
        base = srv.base
        warm = {"k": 2, "max_new_tokens": 16, "question": QUESTIONS[0]}
        for extra in ({}, {"cite": True}, {"decode": "nest"}):  # every path once before the baseline
            httpx.post(base + "/v1/ask", json={**warm, **extra}, timeout=args.request_timeout).raise_for_status()
        if probe:
            srv.proc.send_signal(signal.SIGUSR1)  # the probe's baseline: the server is warm
        stop = time.monotonic() + seconds
        lock = threading.Lock()

        proc = psutil.Process(srv.proc.pid)

        def sample():
            samples.append({"t_s": round(seconds - (stop - time.monotonic()), 1),
                            "rss_mib": round(proc.memory_info().rss / 2**20, 1), "fds": proc.num_fds(),
                            "threads": proc.num_threads()})

        def client(cid: int):
            r = random.Random(cid)
            with httpx.Client(base_url=base, timeout=httpx.Timeout(args.request_timeout)) as c:
                while time.monotonic() < stop:
                    kind = r.choices(["ask", "stream", "drop", "cite", "health", "corpora"], [5, 3, 2, 1, 1, 1])[0]
                    req = {"question": r.choice(QUESTIONS), "k": r.randint(0, 3), "max_new_tokens": r.choice([8, 16, 32, 64])}
                    try:
                        if kind in ("ask", "cite"):
                            resp = c.post("/v1/ask", json={**req, "cite": kind == "cite", "k": max(1, req["k"]) if kind == "cite" else req["k"]})
                            code = resp.status_code
                        elif kind in ("stream", "drop"):
                            with c.stream("POST", "/v1/ask/stream", json=req) as resp:
                                code = resp.status_code
                                for line in resp.iter_lines():
                                    if kind == "drop" and line.startswith("event: token"):
                                        break
                        else:
                            code = c.get("/healthz" if kind == "health" else "/v1/corpora").status_code
                    except httpx.HTTPError as e:
                        code = type(e).__name__
                    with lock:
                        counts[f"{kind}:{code}"] += 1
                    if code == 429:
                        time.sleep(1.0)

        threads = []
        sample()
        next_sample = time.monotonic() + 10
        while time.monotonic() < stop:
            threads = [t for t in threads if t.is_alive()]
            want = rng.randint(1, 6)
            while len(threads) < want:
                t = threading.Thread(target=client, args=(rng.randrange(10**6),), daemon=True)
                t.start()
                threads.append(t)
            time.sleep(min(10.0, max(0.0, next_sample - time.monotonic())))
            if time.monotonic() >= next_sample:
                sample()
                next_sample += 10
        for t in threads:
            t.join(args.request_timeout)
        time.sleep(2)
        sample()
        batching = srv.healthz().get("batching")
        if probe:
            srv.proc.send_signal(signal.SIGUSR2)  # the probe's final sample (and Python allocation diff)
            until = time.monotonic() + 120
            while time.monotonic() < until and '"final": true' not in probe.read_text():
                time.sleep(1)
    first = [s for s in samples[:3]]
    last = [s for s in samples[-3:]]
    med = lambda xs, k: statistics.median(x[k] for x in xs)  # noqa: E731
    errors = {k: v for k, v in counts.items() if not k.endswith(":200") and not k.endswith(":429")}
    out = {"seconds": seconds, "max_batch": max_batch, "requests": dict(sorted(counts.items())), "errors": errors,
           "samples": samples, "batching_after": batching,
           "rss_growth_mib": floor_growth([(s["t_s"], s["rss_mib"]) for s in samples]),
           "rss_growth_median_rule_mib": round(med(last, "rss_mib") - med(first, "rss_mib"), 1),
           "fd_growth": med(last, "fds") - med(first, "fds"),
           "growth_rule": FLOOR_RULE + "; median rule: median of the last 3 samples minus median of the first 3; fds: "
                          "median rule (after every path ran once)"}
    if probe:
        out["probe"] = probe_summary(probe)
    return out


FLOOR_RULE = ("rss: the resident floor (the lowest sample) of the last 2 minutes minus that of the first 2 minutes: "
              "under traffic, RSS swings by up to ~250 MiB with the requests in flight (KV rows, citation forwards), "
              "so single samples measure load, the floor what stays")


def floor_growth(series: list[tuple[float, float]], window_s: float = 120.0) -> float | None:
    """Lowest value in the last ``window_s`` seconds minus lowest in the first ``window_s`` (see FLOOR_RULE)."""
    if len(series) < 2:
        return None
    t0, t1 = series[0][0], series[-1][0]
    head = [v for t, v in series if t <= t0 + window_s]
    tail = [v for t, v in series if t >= t1 - window_s]
    return round(min(tail) - min(head), 1)


def probe_summary(path: Path) -> dict:
    """The memory probe's record from its baseline (the server warm) on: floors by kind of memory, and the Python
    source lines whose allocations grew most by the end (see serve_memprobe.py)."""
    recs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    start = max((i for i, r in enumerate(recs) if r.get("baseline")), default=0)
    end = next((i for i, r in enumerate(recs) if r.get("final")), len(recs) - 1)
    recs = recs[start:end + 1]
    if not recs:
        return {"error": f"no samples in {path}"}
    t0 = recs[0]["t_s"]

    def series(get) -> list[tuple[float, float]]:
        return [(r["t_s"] - t0, v) for r in recs if (v := get(r)) is not None]

    kinds = {"rss": lambda r: r["rss_mib"], "python_traced": lambda r: r.get("python_traced_mib")}
    for k in ("heap", "anon", "file"):
        kinds[f"smaps_{k}"] = lambda r, k=k: (r.get("smaps_mib") or {}).get(k)
    for k in ("in_use_mib", "free_mib", "mmap_blocks_mib"):
        kinds[f"malloc_{k[:-4]}"] = lambda r, k=k: (r.get("malloc") or {}).get(k)
    growth = {k: floor_growth(series(get)) for k, get in kinds.items()}
    return {"samples": len(recs), "growth_mib": growth, "rule": FLOOR_RULE.split(":")[0] + ": floor rule, per kind",
            "baseline": {k: v for k, v in recs[0].items() if k != "python_top_growth"},
            "end": {k: v for k, v in recs[-1].items() if k != "python_top_growth"},
            "python_top_growth_at_end": recs[-1].get("python_top_growth"),
            "series": [{k: v for k, v in r.items() if k != "python_top_growth"} for r in recs]}


def decode_profile(args) -> dict:
    """Where batching's ceiling is: one decoding step's time by rows in the batch, and prompt tokens/s (in process)."""
    from tessera.lm import LocalLM
    from tessera.lm.batching import ContinuousBatcher

    lm = LocalLM.load(args.lm)
    if lm.engine != "llamacpp":
        return {"skipped": f"the {lm.engine} engine has no continuous batching"}
    prompt = lm.encode_chat([{"role": "user", "content": "Tell me a long story about a cat."}])[0].tolist()
    out = {}
    for rows in (1, 2, 4, 8):
        b = ContinuousBatcher(lm._llama, rows)
        list(b.stream(prompt, 4, ()))
        t = time.perf_counter()
        ths = [threading.Thread(target=lambda: list(b.stream(prompt, 64, ()))) for _ in range(rows)]
        for th in ths:
            th.start()
        for th in ths:
            th.join()
        dt = time.perf_counter() - t
        out[str(rows)] = {"step_ms": round(1000 * dt / 64, 2), "new_tokens_per_s": round(rows * 64 / dt, 1)}
        b.close()
    long = lm.tokenizer(" ".join(QUESTIONS * 40), add_special_tokens=False)["input_ids"][:700]
    b = ContinuousBatcher(lm._llama, 1)
    t = time.perf_counter()
    list(b.stream(long, 1, ()))
    out["prompt_tokens_per_s"] = round(len(long) / (time.perf_counter() - t), 1)
    b.close()
    out["speedup_4_rows"] = round(out["4"]["new_tokens_per_s"] / out["1"]["new_tokens_per_s"], 3)
    return out


def soak_goals(sk: dict) -> dict:
    rss, fds = sk.get("rss_growth_mib"), sk.get("fd_growth")
    return {"soak_rss_growth_mb": {"target": 50, "measured": rss, "met": rss is not None and rss <= 50},
            "soak_fd_growth": {"target": 5, "measured": fds, "met": fds is not None and fds <= 5}}


def soak_only(args, results: dict, max_batch: int, wall0: float) -> None:
    """``--soak-only``: the soak alone (a memory investigation), written to serve-soak.json beside serve.json."""
    from tessera.config import atomic_write_text

    print(f"soak: {args.soak:.0f} s of mixed traffic at --max-batch {max_batch} ...", flush=True)
    results["benchmark"] = "serve-soak"
    results["soak"] = soak(args, max_batch, args.soak)
    results["goals"] = soak_goals(results["soak"])
    results["wall_s"] = round(time.monotonic() - wall0, 1)
    results["machine"]["load_average_at_end"] = list(os.getloadavg())
    out = Path(args.out)
    if out == ROOT / "benchmarks" / "results" / "serve.json":
        out = out.with_name("serve-soak.json")
    atomic_write_text(out, json.dumps(results, indent=2) + "\n")
    sk = results["soak"]
    print(json.dumps({"rss_growth_mib": sk["rss_growth_mib"], "rss_growth_median_rule_mib": sk["rss_growth_median_rule_mib"],
                      "fd_growth": sk["fd_growth"], "probe_growth_mib": sk.get("probe", {}).get("growth_mib"),
                      "python_top_growth_at_end": (sk.get("probe") or {}).get("python_top_growth_at_end"),
                      "goals": results["goals"]}, indent=1))
    print(f"wrote {out}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--levels", default="1,4,16", help="concurrent clients per level")
    ap.add_argument("--requests", default="6,16,32", help="requests per level (one number or one per level)")
    ap.add_argument("--max-batches", default="1,4", help="--max-batch of the servers compared (the first is the baseline)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                    help="threads of the server (OMP_NUM_THREADS; llama.cpp takes torch's thread count)")
    ap.add_argument("--lm", default="default")
    ap.add_argument("--queue-size", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--request-timeout", type=float, default=300.0)
    ap.add_argument("--level-timeout", type=float, default=600.0)
    ap.add_argument("--max-retry-wait", type=float, default=5.0)
    ap.add_argument("--max-minutes", type=float, default=30.0)
    ap.add_argument("--peer-requests", type=int, default=6)
    ap.add_argument("--soak", type=float, default=600.0, help="seconds of mixed traffic at the last --max-batches (0: none)")
    ap.add_argument("--quick", action="store_true", help="levels 1,4, 4 and 8 requests, a 60 s soak, no peer")
    ap.add_argument("--soak-probe", action=argparse.BooleanOptionalAction, default=True,
                    help="run the soak's server under serve_memprobe.py: resident memory by kind (smaps) and glibc's "
                         "live and free bytes (mallinfo2) every 10 s, in serve.json's soak.probe")
    ap.add_argument("--soak-tracemalloc", type=int, default=0, metavar="FRAMES",
                    help="with --soak-probe: also trace Python allocations (slows the server and adds memory)")
    ap.add_argument("--soak-only", action="store_true",
                    help="only the soak (with --soak-probe: a memory profile); writes serve-soak.json, not serve.json")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "serve.json"))
    ap.add_argument("--decode-heavy", action=argparse.BooleanOptionalAction, default=True,
                    help="also 4 clients x 8 requests with k 0 and 128 new tokens at both --max-batches")
    ap.add_argument("--profile-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.profile_only:
        print(json.dumps(decode_profile(args)))
        return
    if args.quick:
        args.levels, args.requests, args.soak, args.peer_requests, args.decode_heavy = "1,4", "4,8", 60.0, 0, False
    wall0 = time.monotonic()
    levels = [int(x) for x in args.levels.split(",")]
    counts = [int(x) for x in args.requests.split(",")]
    counts = counts * len(levels) if len(counts) == 1 else counts
    batches = [int(x) for x in args.max_batches.split(",")]
    if len(counts) != len(levels):
        sys.exit("error: --requests needs one number or one per level")
    run_deadline = time.monotonic() + args.max_minutes * 60
    info = machine(args.threads)
    results: dict = {"benchmark": "serve", "machine": info, "config": {k: v for k, v in vars(args).items() if k != "out"}}
    if args.soak_only:
        return soak_only(args, results, batches[-1], wall0)
    if args.peer_requests > 0:
        print("in-process peer ...", flush=True)
        results["peer_in_process"] = in_process_peer(args, args.peer_requests)
    print("decode profile (a fresh process: llama.cpp runs 2.6x slower per step in a process whose own ask pipeline "
          "has run, as the in-process peer's has) ...", flush=True)
    prof = subprocess.run([sys.executable, __file__, "--profile-only", "--lm", args.lm], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
    if prof.returncode != 0:
        raise SystemExit(f"error: the decode profile failed: {prof.stderr[-500:]}")
    results["decode_profile"] = json.loads(prof.stdout.strip().splitlines()[-1])
    print(json.dumps(results["decode_profile"]), flush=True)
    results["servers"] = [run_server(args, mb, levels, counts, run_deadline) for mb in batches]
    if args.decode_heavy:
        # where decoding dominates (no passages, long answers) batching shares most of each request's work
        heavy = {"k": 0, "max_new_tokens": 128, "decode": "greedy", "cite": False}
        results["decode_heavy"] = {"body": heavy, "servers": [
            run_server(args, mb, [4], [8], run_deadline, body=heavy) for mb in (batches[0], batches[-1])]}
        hv = [sv["levels"][0] for sv in results["decode_heavy"]["servers"]]
        if all("completed" in lv for lv in hv):
            results["decode_heavy"]["throughput_ratio_4_clients"] = round(hv[1]["throughput_rps"] / hv[0]["throughput_rps"], 3)
    if args.soak > 0:
        left = run_deadline - time.monotonic() - 60
        seconds = min(args.soak, left)
        if seconds >= 60:
            print(f"soak: {seconds:.0f} s of mixed traffic at --max-batch {batches[-1]} ...", flush=True)
            results["soak"] = soak(args, batches[-1], seconds)
            print(json.dumps({k: v for k, v in results["soak"].items() if k != "samples"}), flush=True)
        else:
            results["soak"] = {"skipped": "run deadline (--max-minutes) reached"}

    def level(server: dict, c: int) -> dict | None:
        return next((lv for lv in server["levels"] if lv.get("concurrency") == c and "completed" in lv), None)

    base, batched = results["servers"][0], results["servers"][-1]
    b1, b4, s1, s4, b16 = level(batched, 1), level(batched, 4), level(base, 1), level(base, 4), level(batched, 16)
    tp_ratio = round(b4["throughput_rps"] / s4["throughput_rps"], 3) if b4 and s4 else None
    p50_ratio = round(b4["latency_s"]["p50"] / b1["latency_s"]["p50"], 3) if b4 and b1 else None
    errs16 = b16["other_errors"] if b16 else None
    sk = results.get("soak", {})
    results["figures"] = {
        "throughput_rps": {f"max_batch_{s['max_batch']}": {lv["concurrency"]: lv["throughput_rps"] for lv in s["levels"]
                                                            if "completed" in lv} for s in results["servers"]},
        "latency_p50_s": {f"max_batch_{s['max_batch']}": {lv["concurrency"]: lv["latency_s"]["p50"] for lv in s["levels"]
                                                           if "completed" in lv} for s in results["servers"]},
        "time_to_first_token_p50_s": {f"max_batch_{s['max_batch']}": {lv["concurrency"]: lv["time_to_first_token_s"]["p50"]
                                                                       for lv in s["levels"] if "completed" in lv}
                                      for s in results["servers"]},
        "ttft_rule": "server-side: queue wait + retrieval + prompt and first token (HTTP not included)",
    }
    prof = results["decode_profile"]
    if s4 and s4.get("mean_prompt_tokens") and "prompt_tokens_per_s" in prof:
        # what batching could give at best here: each request's prompt is computed alone either way (prefill is
        # compute-bound), only its decoding steps are shared
        prefill_s = s4["mean_prompt_tokens"] / prof["prompt_tokens_per_s"]
        n = s4["mean_new_tokens"]
        one = prefill_s + n * prof["1"]["step_ms"] / 1000
        four = 4 * prefill_s + n * prof["4"]["step_ms"] / 1000
        results["figures"]["throughput_ratio_ceiling_4_clients"] = {
            "value": round(4 * one / four, 3), "prefill_s_per_request": round(prefill_s, 3),
            "decode_s_per_request_alone": round(n * prof["1"]["step_ms"] / 1000, 3),
            "rule": "4 x (prefill + N decoding steps of 1 row) / (4 prefills + N steps of 4 rows), from decode_profile"}
    if s1 and "peer_in_process" in results:
        results["figures"]["server_over_in_process_latency_p50"] = round(
            s1["latency_s"]["p50"] / results["peer_in_process"]["latency_s"]["p50"], 3)
    results["goals"] = {
        "serve_4_clients_throughput_ratio": {"target": 3, "measured": tp_ratio, "met": tp_ratio is not None and tp_ratio >= 3},
        "serve_p50_ratio_4_clients": {"target": 1.5, "measured": p50_ratio, "met": p50_ratio is not None and p50_ratio <= 1.5},
        "serve_16_clients_errors": {"target": 0, "measured": errs16, "met": errs16 == 0},
        **soak_goals(sk),
    }
    results["wall_s"] = round(time.monotonic() - wall0, 1)
    results["machine"]["load_average_at_end"] = list(os.getloadavg())
    out = Path(args.out)
    from tessera.config import atomic_write_text

    atomic_write_text(out, json.dumps(results, indent=2) + "\n")
    print(json.dumps({"figures": results["figures"], "goals": results["goals"]}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
