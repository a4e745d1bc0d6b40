"""Benchmark of the main job, `tessera ask`, on the embedded defaults.

Measures, in one run on this machine:
- cold and warm wall time of the `tessera ask` command (cold: an empty
  $TESSERA_HOME, so the GGUF conversion and the index build are included;
  warm: the same command again);
- time to first token and generation speed as reported by the command;
- BM25 retrieval latency per query over the Python-docs passages;
- tokens/s of tessera's streaming loop against `model.generate` of transformers
  on the same prompt, greedy, same model, as a ratio.

Writes benchmarks/results/ask.json.  Usage: python benchmarks/ask.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from tessera import __version__
from tessera.config import atomic_write_text
from tessera.ask import fit_sources, Source
from tessera.lm import GenerationStats, LocalLM
from tessera.retrieval.corpus_index import CorpusIndex

QUESTION = "How do I give a function parameter a default value?"
QUERIES = [
    "How do I give a function parameter a default value?",
    "What does the with statement do?",
    "How are exceptions raised and caught?",
    "What is the difference between a list and a tuple?",
    "How do I define a class with a constructor?",
    "What does the yield keyword do in a function?",
    "How does string formatting with format specifiers work?",
    "What is a lambda expression?",
    "How do import statements find modules?",
    "What are the rules for operator precedence?",
    "How do I write an async function and await it?",
    "What does the global statement do?",
    "How are dictionaries compared for equality?",
    "What is slicing and how do negative indices work?",
    "How do decorators work?",
    "What happens when a for loop iterates over an iterator?",
    "How does the assert statement behave under optimisation?",
    "What is name mangling of private attributes?",
    "How do I delete an item from a list?",
    "What does the match statement do?",
]
ROOT = Path(__file__).resolve().parents[1]


def run_ask(home: str) -> tuple[float, dict]:
    env = {**os.environ, "TESSERA_HOME": home}
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "tessera.cli", "--quiet", "ask", QUESTION, "--json", "--max-new-tokens", "128"],
                       capture_output=True, text=True, env=env, cwd=ROOT)
    wall = time.perf_counter() - t
    if r.returncode != 0:
        raise SystemExit(f"tessera ask failed: {r.stderr.strip()}")
    return wall, json.loads(r.stdout)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "ask.json"))
    args = ap.parse_args()

    results: dict = {
        "benchmark": "ask",
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
                    "load_average_at_start": os.getloadavg()[0]},
        "versions": {"tessera": __version__, "torch": torch.__version__},
        "config": {"question": QUESTION, "corpus": "python-docs", "lm": "default (SmolLM2-135M-Instruct, fp32)",
                   "k": 3, "max_new_tokens_cli": 128, "new_tokens_generation": args.new_tokens, "repeats": args.repeats},
    }
    import transformers

    results["versions"]["transformers"] = transformers.__version__

    # 1. cold and warm CLI wall time
    with tempfile.TemporaryDirectory() as home:
        cold_wall, cold = run_ask(home)
        warm = [run_ask(home) for _ in range(args.repeats)]
    warm_walls = [w for w, _ in warm]
    results["cli"] = {
        "cold_wall_s": round(cold_wall, 2),
        "warm_wall_s_median": round(statistics.median(warm_walls), 2),
        "warm_wall_s_all": [round(w, 2) for w in warm_walls],
        "warm_time_to_first_token_s": round(statistics.median(o["stats"]["time_to_first_token_s"] for _, o in warm), 3),
        "warm_index_load_s": round(statistics.median(o["timings"]["index_s"] for _, o in warm), 3),
        "warm_model_load_s": round(statistics.median(o["timings"]["load_model_s"] for _, o in warm), 3),
        "cold_index_build_s": round(cold["timings"]["index_s"], 2),
        "cold_model_load_s": round(cold["timings"]["load_model_s"], 2),
        "answer_tokens": warm[0][1]["stats"]["new_tokens"],
        "top_source": warm[0][1]["sources"][0]["doc_id"] if warm[0][1]["sources"] else None,
    }

    # 2. retrieval latency per query
    index = CorpusIndex.open("python-docs")
    index.search(QUERIES[0], 3)
    lat = []
    for _ in range(5):
        for q in QUERIES:
            t = time.perf_counter()
            index.search(q, 3)
            lat.append((time.perf_counter() - t) * 1000)
    lat.sort()
    results["retrieval"] = {"passages": len(index.passages), "queries": len(lat), "k": 3,
                            "latency_ms_mean": round(statistics.mean(lat), 3), "latency_ms_p50": round(lat[len(lat) // 2], 3),
                            "latency_ms_p95": round(lat[int(len(lat) * 0.95)], 3)}

    # 3. tessera's loop vs model.generate, same prompt, greedy
    lm = LocalLM.load("default", device="cpu")
    hits = index.search(QUESTION, 3)
    sources = [Source(h.rank, h.passage.doc_id, h.passage.title, h.passage.id, h.score, h.passage.text, h.passage.start, h.passage.end) for h in hits]
    _, ids = fit_sources(lm, QUESTION, sources, 2048)
    lm.generate(ids, max_new_tokens=4)  # warm-up: one-time allocations are not part of either figure
    ours, theirs = [], []
    for _ in range(args.repeats):
        st = GenerationStats()
        text = "".join(lm.stream(ids, max_new_tokens=args.new_tokens, stats=st))
        ours.append((st.new_tokens / st.total_s, st))
        with torch.inference_mode():
            t = time.perf_counter()
            out = lm.model.generate(ids, max_new_tokens=args.new_tokens, do_sample=False, pad_token_id=lm.tokenizer.pad_token_id)
            dt = time.perf_counter() - t
        gen_ids = [i for i in out[0, ids.shape[1]:].tolist() if i not in lm.stop_ids]
        theirs.append((len(gen_ids) / dt, len(gen_ids)))
        same_text = lm.tokenizer.decode(gen_ids, skip_special_tokens=True).strip() == text.strip()
    ours_tps = statistics.median(r for r, _ in ours)
    theirs_tps = statistics.median(r for r, _ in theirs)
    results["generation"] = {
        "prompt_tokens": int(ids.shape[1]),
        "new_tokens_tessera": ours[0][1].new_tokens,
        "new_tokens_generate": theirs[0][1],
        "same_output_text": same_text,
        "tessera_tokens_per_s": round(ours_tps, 2),
        "tessera_decode_tokens_per_s": round(statistics.median(st.tokens_per_s for _, st in ours), 2),
        "tessera_time_to_first_token_s": round(statistics.median(st.time_to_first_token_s for _, st in ours), 3),
        "hf_generate_tokens_per_s": round(theirs_tps, 2),
        "speed_ratio_tessera_over_generate": round(ours_tps / theirs_tps, 3),
        "note": "tokens/s = generated tokens / total time including prefill, median of repeats",
    }
    out = Path(args.out)
    atomic_write_text(out, json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
