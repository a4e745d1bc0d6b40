"""Benchmark of tessera's local LM engine (``tessera.lm.local.LocalLM``) on the embedded SmolLM2-135M.

Measures, in one run on this machine, tessera's engine against ``model.generate`` of
transformers (the peer) and against the engine tessera had before (``engine="hf"``: a
left-padded ``model.generate`` for batches, one padded forward pass for scoring):

- batch-1 decode tokens/s and time to first token, prompts of 64, 512 and 1,536 tokens;
- batched greedy generation tokens/s at batch 1, 4, 8, 16, 32, mixed prompt lengths;
- the ReasonIR synthesis workload (real HQ prompts over SciFact documents, batch 16): prompts/s;
- log-likelihood scoring tokens/s on SelfCite's context-ablation workload (HotpotQA contexts,
  every sentence dropped and held alone, the statement's tokens scored) and on MMLU option scoring;
- `tessera ask` warm wall time (median of 3), peak resident memory, the load average;
- profiles (top functions) of the synthesis and scoring workloads;
- llama.cpp (``llama-cpp-python``, when installed) in the same run: tessera's wrapper against the library
  called directly, the shipped Q4_1 file against its Q8_0 repack, greedy agreement with the transformers
  model, the synthesis and scoring workloads, and `tessera ask --engine llamacpp`.

Writes benchmarks/results/lm.json (with ``goals``) and lm.png (tokens/s against batch size).
Usage: python benchmarks/lm.py [--quick]   (default about 15-20 minutes here; --quick about 2)
"""

from __future__ import annotations

import argparse
import inspect
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import goal, machine, package_versions, write_json  # noqa: E402

from tessera.data.paths import shared_data_dir  # noqa: E402
from tessera.lm.local import LocalLM  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
QUESTION = "How do I give a function parameter a default value?"


def has_engine(fn) -> bool:
    return "engine" in inspect.signature(fn).parameters


def text_tokens(lm: LocalLM, n_tokens: int) -> list[int]:
    """The first ``n_tokens`` tokens of WikiText-2 test (real text; the tokenizer's own pieces)."""
    data = shared_data_dir()
    if data is None or not (data / "wikitext2" / "wiki.test.raw").is_file():
        raise SystemExit("benchmarks/lm.py needs ../shared/data/wikitext2/wiki.test.raw")
    text = (data / "wikitext2" / "wiki.test.raw").read_text(encoding="utf-8")[: n_tokens * 8]
    ids = lm.tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids[:n_tokens]


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


# --------------------------------------------------------------------------------- batch-1 decode
def hf_generate(lm: LocalLM, ids: list[int], max_new_tokens: int, min_new: bool = True, prompt_lookup: int = 0):
    x = torch.tensor([ids])
    kw = dict(max_new_tokens=max_new_tokens, do_sample=False, temperature=None, top_p=None, top_k=None,
              pad_token_id=lm.pad_id)
    if prompt_lookup:
        kw["prompt_lookup_num_tokens"] = prompt_lookup
    if min_new:
        kw["min_new_tokens"] = max_new_tokens
    with torch.inference_mode():
        return lm.model.generate(x, attention_mask=torch.ones_like(x), **kw)[0, len(ids):].tolist()


def batch1(lm: LocalLM, lengths, new_tokens: int) -> dict:
    from tessera.lm.local import GenerationStats

    out = {}
    base = text_tokens(lm, max(lengths))
    for L in lengths:
        ids = base[:L]
        # tessera's stream (its stats: time to first token, decode tokens/s)
        st = GenerationStats()
        t_stream, text = timed(lambda: "".join(lm.stream(torch.tensor([ids]), max_new_tokens=new_tokens, stats=st)))
        # model.generate: time to first token = a 1-token call; decode = the rest
        ttft_hf, _ = timed(lambda: hf_generate(lm, ids, 1))
        t_hf, gen = timed(lambda: hf_generate(lm, ids, new_tokens, min_new=False))
        n_hf = len([t for t in gen if t not in lm.stop_ids])
        row = {
            "prompt_tokens": L,
            "tessera": {"new_tokens": st.new_tokens, "time_to_first_token_s": round(st.time_to_first_token_s, 3),
                        "decode_tokens_per_s": round(st.tokens_per_s, 2), "wall_s": round(t_stream, 2),
                        "lookup_drafted": st.drafted_tokens, "lookup_accepted": st.accepted_tokens},
            "generate": {"new_tokens": n_hf, "time_to_first_token_s": round(ttft_hf, 3),
                         "decode_tokens_per_s": round((n_hf - 1) / max(t_hf - ttft_hf, 1e-9), 2), "wall_s": round(t_hf, 2)},
            "same_text": lm.tokenizer.decode([t for t in gen if t not in lm.stop_ids], skip_special_tokens=True) == text,
        }
        if hasattr(lm, "lookup_tokens"):  # the engine without prompt-lookup speculation, and generate with it
            keep, lm.lookup_tokens = lm.lookup_tokens, 0
            st0 = GenerationStats()
            t0, text0 = timed(lambda: "".join(lm.stream(torch.tensor([ids]), max_new_tokens=new_tokens, stats=st0)))
            lm.lookup_tokens = keep
            row["tessera_no_lookup"] = {"decode_tokens_per_s": round(st0.tokens_per_s, 2), "wall_s": round(t0, 2),
                                        "same_text": text0 == text}
            t_pl, gen_pl = timed(lambda: hf_generate(lm, ids, new_tokens, min_new=False, prompt_lookup=keep))
            n_pl = len([t for t in gen_pl if t not in lm.stop_ids])
            row["generate_prompt_lookup"] = {"decode_tokens_per_s": round((n_pl - 1) / max(t_pl - ttft_hf, 1e-9), 2),
                                             "wall_s": round(t_pl, 2), "same_tokens": gen_pl == gen}
        row["decode_ratio_tessera_over_generate"] = round(row["tessera"]["decode_tokens_per_s"] / max(row["generate"]["decode_tokens_per_s"], 1e-9), 3)
        out[str(L)] = row
        print(f"batch1 L={L}: {row}", flush=True)
    return out


# --------------------------------------------------------------------------------- batched generation
def mixed_prompts(lm: LocalLM, n: int, lo: int, hi: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    base = text_tokens(lm, hi * 4 + 64)
    rows = []
    for _ in range(n):
        L = int(torch.randint(lo, hi + 1, (1,), generator=g))
        s = int(torch.randint(0, len(base) - L, (1,), generator=g))
        rows.append(base[s:s + L])
    return rows


def batched(lm: LocalLM, sizes, new_tokens: int, lo: int, hi: int) -> dict:
    out = {}
    for B in sizes:
        prompts = mixed_prompts(lm, B, lo, hi, seed=B)
        row = {"batch": B, "prompt_tokens": [len(p) for p in prompts]}
        engines = [("generate", {"engine": "hf"} if has_engine(lm.generate_batch) else {})]
        if has_engine(lm.generate_batch):
            engines.append(("tessera", {"engine": "tessera"}))
        outs = {}
        for name, kw in engines:
            dt, res = timed(lambda: lm.generate_batch(prompts, max_new_tokens=new_tokens, **kw))
            n = sum(len(r.token_ids) for r in res)
            outs[name] = [r.token_ids for r in res]
            row[name] = {"new_tokens": n, "wall_s": round(dt, 2), "tokens_per_s": round(n / dt, 2)}
        if "tessera" in outs:
            row["rows_identical"] = sum(a == b for a, b in zip(outs["tessera"], outs["generate"])) / B
            row["ratio_tessera_over_generate"] = round(row["tessera"]["tokens_per_s"] / row["generate"]["tokens_per_s"], 3)
        out[str(B)] = row
        print(f"batched B={B}: { {k: v for k, v in row.items() if k != 'prompt_tokens'} }", flush=True)
    return out


# --------------------------------------------------------------------------------- ReasonIR synthesis workload
def synth_workload(lm: LocalLM, n_docs: int, batch: int, new_tokens: int) -> dict:
    from tessera.data.ir import read_scifact
    from tessera.lm.local_backend import LocalBackend
    from tessera.retrieval.synth import hq_messages, seed_documents

    data = shared_data_dir()
    coll = read_scifact(data / "ir" / "scifact")
    docs = seed_documents(coll.docs)[0][:n_docs]
    convs = [hq_messages(d) for d in docs]
    prefix = '{"domain": "'
    out = {"documents": len(docs), "batch": batch, "max_new_tokens": new_tokens}
    backend = LocalBackend(lm, batch_size=batch)
    prompts = [backend.encode(c, prefix) for c in convs]
    out["prompt_tokens_mean"] = round(statistics.mean(len(p) for p in prompts), 1)
    shared = 0
    while all(len(p) > shared and p[shared] == prompts[0][shared] for p in prompts):
        shared += 1
    out["shared_prefix_tokens"] = shared
    engines = [("generate_batch", "hf")] + ([("tessera", "tessera")] if has_engine(lm.generate_batch) else [])
    texts = {}
    for name, engine in engines:
        if has_engine(lm.generate_batch):
            backend.engine = engine
        dt, gens = timed(lambda: backend.chat(convs, max_new_tokens=new_tokens, prefix=prefix))
        texts[name] = [g.text for g in gens]
        out[name] = {"wall_s": round(dt, 2), "prompts_per_s": round(len(convs) / dt, 3),
                     "new_tokens": sum(g.new_tokens for g in gens), "errors": sum(not g.ok for g in gens)}
    if "tessera" in texts:
        out["speedup"] = round(out["tessera"]["prompts_per_s"] / out["generate_batch"]["prompts_per_s"], 3)
        out["outputs_identical"] = sum(a == b for a, b in zip(texts["tessera"], texts["generate_batch"])) / len(convs)
    out["sample_output"] = texts["generate_batch"][0][:200]
    # where the time goes, one batch: prefill (the call with 1 new token) and decoding (the rest)
    if has_engine(lm.generate_batch):
        one = prompts[:batch]
        br = {}
        for name, engine in engines:
            t1, _ = timed(lambda: lm.generate_batch(one, max_new_tokens=1, engine=engine))
            tn, _ = timed(lambda: lm.generate_batch(one, max_new_tokens=new_tokens, engine=engine))
            br[name] = {"prefill_s": round(t1, 2), "decode_s": round(tn - t1, 2), "decode_ms_per_step": round(1000 * (tn - t1) / max(1, new_tokens - 1), 1)}
        br["note"] = ("one batch of the workload; prefill = a call with max_new_tokens=1. The engine runs the "
                      f"shared {shared}-token prefix once; its decoding floor is one read of the 0.54 GB of fp32 "
                      "weights per step (about 45 ms here) plus the rows' KV cache")
        out["breakdown_one_batch"] = br
    print(f"synth: {out}", flush=True)
    return out


# --------------------------------------------------------------------------------- scoring workloads
def selfcite_rows(lm: LocalLM, n_examples: int, max_distractors: int) -> list[tuple[list[int], int]]:
    from tessera.attribution.format import CitePrompt
    from tessera.attribution.hotpot import hotpot_context
    from tessera.data.qa import read_hotpotqa

    exs = read_hotpotqa(shared_data_dir() / "hotpotqa" / "hotpot_dev_distractor_v1_first40.json")[:n_examples]
    rows = []
    for ex in exs:
        ctx = hotpot_context(ex, max_distractors, -1)
        prompt = CitePrompt(lm.tokenizer, ctx, ex.question)
        stmt = lm.tokenizer(f"The answer is {ex.answer}.", add_special_tokens=False)["input_ids"]
        n_ctx = len(ctx.sentences)
        everything = set(range(1, n_ctx + 1))
        for i in range(1, n_ctx + 1):  # SelfCite: drop sentence i (probability drop), hold sentence i alone (hold)
            rows.append((prompt.ids(everything - {i}) + stmt, len(stmt)))
            rows.append((prompt.ids([i]) + stmt, len(stmt)))
        rows.append((prompt.ids() + stmt, len(stmt)))
    return rows


def scoring(lm: LocalLM, quick: bool) -> dict:
    from tessera.data.qa import read_mmlu
    from tessera.lm.local_backend import LocalBackend
    from tessera.rag import LETTERS, mmlu_messages

    out = {}
    rows = selfcite_rows(lm, 1 if quick else 3, 2 if quick else 3)
    tokens = sum(len(r) for r, _ in rows)
    sc = {"rows": len(rows), "tokens": tokens, "mean_row_tokens": round(tokens / len(rows), 1), "batch": 8}
    # today's path: one left-padded forward pass per batch of length-sorted rows
    dt, ref = timed(lambda: lm.score(rows, batch_size=8, engine="hf"))
    sc["padded_forward"] = {"wall_s": round(dt, 2), "tokens_per_s": round(tokens / dt, 1)}
    if hasattr(lm, "score"):
        dt2, new = timed(lambda: lm.score(rows, batch_size=8))
        sc["tessera"] = {"wall_s": round(dt2, 2), "tokens_per_s": round(tokens / dt2, 1)}
        sc["speedup"] = round(dt / dt2, 3)
        sc["tessera"]["computed_tokens"] = lm.last_score_stats["computed_tokens"]
        sc["token_ratio_padded_over_computed"] = round(tokens / lm.last_score_stats["computed_tokens"], 3)
        diffs = [abs(a - b) for r1, r2 in zip(ref, new) for a, b in zip(r1, r2)]
        sc["max_abs_logprob_diff"] = float(max(diffs))
    out["selfcite_ablation"] = sc
    print(f"scoring selfcite: {sc}", flush=True)

    qs = read_mmlu(shared_data_dir() / "mmlu", "val")[: 16 if quick else 96]
    backend = LocalBackend(lm, batch_size=8)
    convs = [mmlu_messages(q) for q in qs]
    n_tok = sum(len(backend.encode(c, "Answer:")) for c in convs)
    mm = {"questions": len(qs), "prompt_tokens": n_tok}
    engines = [("batched_last_logprobs", "hf")] + ([("tessera", "tessera")] if has_engine(lm.batched_last_logprobs) else [])
    res = {}
    for name, engine in engines:
        if has_engine(lm.batched_last_logprobs):
            backend.engine = engine
        dt, lps = timed(lambda: backend.next_token_logprobs(convs, LETTERS, prefix="Answer:"))
        res[name] = lps
        mm[name] = {"wall_s": round(dt, 2), "tokens_per_s": round(n_tok / dt, 1)}
    if "tessera" in res:
        mm["speedup"] = round(mm["tessera"]["tokens_per_s"] / mm["batched_last_logprobs"]["tokens_per_s"], 3)
        mm["max_abs_logprob_diff"] = max(abs(a[k] - b[k]) for a, b in zip(res["tessera"], res["batched_last_logprobs"]) for k in a)
    out["mmlu_options"] = mm
    print(f"scoring mmlu: {mm}", flush=True)
    return out


# --------------------------------------------------------------------------------- tessera ask
def ask_warm(repeats: int, engine: str = "tessera") -> dict:
    env = {**os.environ}
    cmd = [sys.executable, "-m", "tessera.cli", "--quiet", "ask", QUESTION, "--json", "--max-new-tokens", "128",
           "--engine", engine]
    subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, check=True)  # warm: conversion + index
    walls, tokens = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
        walls.append(time.perf_counter() - t)
        if r.returncode != 0:
            raise SystemExit(f"tessera ask failed: {r.stderr.strip()}")
        import json

        tokens.append(json.loads(r.stdout)["stats"])
    return {"wall_s_all": [round(w, 2) for w in walls], "wall_s_median": round(statistics.median(walls), 2),
            "stats": tokens[0]}


def ask_breakdown(engine: str) -> dict:
    """Where a warm ``tessera ask`` spends its time: interpreter + imports, then the in-process timings."""
    import json

    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import tessera.cli, tessera.ask, tessera.lm.local"], check=True, cwd=ROOT)
    imports = time.perf_counter() - t
    cmd = [sys.executable, "-m", "tessera.cli", "--quiet", "ask", QUESTION, "--json", "--max-new-tokens", "128",
           "--engine", engine]
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, check=True)
    wall = time.perf_counter() - t
    tm = json.loads(r.stdout)["timings"]
    return {"wall_s": round(wall, 2), "python_and_imports_s": round(imports, 2),
            **{k: round(v, 3) for k, v in tm.items()},
            "rest_s": round(wall - imports - sum(tm[k] for k in ("index_s", "load_model_s", "retrieve_s", "generate_s")), 2)}


def profile_top(fn, n: int = 12) -> list[dict]:
    """The ``n`` functions with the most own time (cProfile) while ``fn()`` runs."""
    import cProfile
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    try:
        fn()
    finally:
        prof.disable()
    st = pstats.Stats(prof)
    rows = sorted(st.stats.items(), key=lambda kv: -kv[1][2])[:n]
    total = sum(v[2] for v in st.stats.values())
    return [{"function": f"{Path(f).name}:{line}({name})" if f != "~" else name, "calls": v[1],
             "own_s": round(v[2], 3), "share": round(v[2] / total, 3)} for (f, line, name), v in rows]


def profiles(lm: LocalLM, quick: bool) -> dict:
    """Top functions of the two missed engine goals: one synthesis batch and the SelfCite scoring rows."""
    from tessera.data.ir import read_scifact
    from tessera.lm.local_backend import LocalBackend
    from tessera.retrieval.synth import hq_messages, seed_documents

    coll = read_scifact(shared_data_dir() / "ir" / "scifact")
    docs = seed_documents(coll.docs)[0][: 8 if quick else 16]
    backend = LocalBackend(lm, batch_size=len(docs))
    backend.engine = "tessera"
    convs = [hq_messages(d) for d in docs]
    rows = selfcite_rows(lm, 1, 2 if quick else 3)
    return {
        "synthesis_one_batch": profile_top(lambda: backend.chat(convs, max_new_tokens=16 if quick else 48,
                                                                prefix='{"domain": "')),
        "selfcite_scoring": profile_top(lambda: lm.score(rows, batch_size=8, engine="tessera")),
        "note": "own time per function (cProfile); torch's matrix products (linear, matmul, SDPA) dominate both: "
                "the prefills run at the fp32 matrix-product rate of this CPU, so the remaining gap is compute, "
                "not Python overhead or padding",
    }


def llamacpp(ref: LocalLM, results: dict, quick: bool, skip_ask: bool) -> dict:
    """llama.cpp in the same run: tessera's wrapper vs llama-cpp-python called directly, the shipped Q4_1 file
    vs the Q8_0 repack, greedy agreement with the transformers model, the synthesis and scoring workloads,
    and ``tessera ask --engine llamacpp``."""
    from tessera import hub
    from tessera.lm import llamacpp as L
    from tessera.lm.local import GenerationStats

    if not L.available():
        return {"installed": False, "note": f"llama-cpp-python is not installed ({L.INSTALL})"}
    import llama_cpp

    from tessera.lm.local_backend import LocalBackend

    lm = LocalLM.load("default", engine="llamacpp")
    eng = lm._llama
    out = {"installed": True, "version": llama_cpp.__version__, "threads": eng.threads, "run_file": eng.path.name}
    new = 32 if quick else 128

    # 1. batch 1, the 64-token WikiText prompt of `batch1`: the wrapper (LocalLM.stream) vs Llama.generate
    prompt = text_tokens(lm, 64)
    reps = 2 if quick else 3

    def wrapper():
        eng.llm.reset()
        st = GenerationStats()
        t = time.perf_counter()
        "".join(lm.stream(torch.tensor([prompt]), max_new_tokens=new, stats=st))
        return st.new_tokens / (time.perf_counter() - t), st.tokens_per_s, st.time_to_first_token_s

    def direct():
        llm = eng.llm
        llm.reset()
        t = time.perf_counter()
        n, t1 = 0, None
        for tok in llm.generate(prompt, temp=0.0, top_k=0, top_p=1.0, min_p=0.0):
            t1 = t1 or time.perf_counter()
            n += 1
            if n >= new or tok in lm.stop_ids:
                break
        end = time.perf_counter()
        return n / (end - t), (n - 1) / (end - t1), t1 - t

    runs = {"wrapper": [wrapper() for _ in range(reps)], "direct": [direct() for _ in range(reps)]}
    b1 = {}
    for name, rs in runs.items():
        best = max(rs, key=lambda r: r[0])
        b1[name] = {"tokens_per_s": round(best[0], 1), "decode_tokens_per_s": round(best[1], 1),
                    "time_to_first_token_s": round(best[2], 3), "all_tokens_per_s": [round(r[0], 1) for r in rs]}
    b1["wrapper_over_direct"] = round(b1["wrapper"]["tokens_per_s"] / b1["direct"]["tokens_per_s"], 3)
    tessera_decode = results["batch1"]["64"]["tessera"]["decode_tokens_per_s"]
    b1["tessera_engine_decode_tokens_per_s"] = tessera_decode
    b1["tessera_engine_over_llamacpp_decode"] = round(tessera_decode / b1["direct"]["decode_tokens_per_s"], 3)
    out["batch1"] = b1
    print(f"llamacpp batch1: {b1}", flush=True)

    # 2. the shipped Q4_1 file vs the Q8_0 repack: prefill of 512 tokens, decode of `new` tokens
    files = {}
    long = text_tokens(lm, 512)
    for name, path in (("shipped_q4_1", hub.embedded_lm_gguf()), ("repacked_q8_0", L.run_file(hub.embedded_lm_gguf()))):
        e = eng if Path(path) == eng.path else L.LlamaCppEngine(path)
        e._reuse([], 0)
        e._eval(long[:16], 15)  # warm-up
        pre = []
        for _ in range(2):
            e._reuse([], 0)
            t = time.perf_counter()
            e._eval(long, len(long) - 1)
            pre.append(time.perf_counter() - t)
        e._reuse([], 0)
        t = time.perf_counter()
        n = sum(1 for _ in e.tokens(prompt, new))
        files[name] = {"file_mib": round(Path(path).stat().st_size / 2**20, 1),
                       "prefill_tokens_per_s": round(len(long) / min(pre), 1),
                       "generate_tokens_per_s_64_prompt": round(n / (time.perf_counter() - t), 1)}
    out["files"] = files
    print(f"llamacpp files: {files}", flush=True)

    # 3. greedy agreement: first 32 greedy tokens of open answers to MMLU questions (asked to explain, so that
    # the answers run past 32 tokens), each llama.cpp file vs the transformers model (the Q4_1 weights
    # dequantized to fp32, tessera engine)
    from tessera.data.qa import read_mmlu

    qs = read_mmlu(shared_data_dir() / "mmlu", "val")[: 8 if quick else 32]
    prompts = [lm.encode_chat([{"role": "user", "content": f"{q.question}\nExplain the answer in a few sentences."}])[0].tolist()
               for q in qs]
    want = [r.token_ids for r in ref.generate_batch(prompts, max_new_tokens=32, engine="tessera")]
    agree = {}
    for name, path in (("repacked_q8_0", eng.path), ("shipped_q4_1", hub.embedded_lm_gguf())):
        e = eng if Path(path) == eng.path else L.LlamaCppEngine(path)
        got = [t for t, _ in e.generate(prompts, 32, ref.stop_ids, 0.0, 1.0, 0)]
        same = [a == b for a, b in zip(got, want)]
        prefix = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b))) for a, b in zip(got, want)]
        agree[name] = {"prompts": len(prompts), "identical_32_tokens": round(sum(same) / len(same), 3),
                       "mean_agreeing_prefix_tokens": round(statistics.mean(prefix), 1),
                       "mean_reference_tokens": round(statistics.mean(len(w) for w in want), 1)}
    out["greedy_agreement"] = agree
    print(f"llamacpp agreement: {agree}", flush=True)

    # 4. the synthesis workload (same prompts as `synth_workload`) and the SelfCite scoring rows
    from tessera.data.ir import read_scifact
    from tessera.retrieval.synth import hq_messages, seed_documents

    syn = results["synthesis"]
    docs = seed_documents(read_scifact(shared_data_dir() / "ir" / "scifact").docs)[0][: syn["documents"]]
    backend = LocalBackend(lm, batch_size=syn["batch"])
    dt, gens = timed(lambda: backend.chat([hq_messages(d) for d in docs], max_new_tokens=syn["max_new_tokens"],
                                          prefix='{"domain": "'))
    out["synthesis"] = {"wall_s": round(dt, 2), "prompts_per_s": round(len(docs) / dt, 3),
                        "over_tessera_engine": round(len(docs) / dt / syn["tessera"]["prompts_per_s"], 3)
                        if "tessera" in syn else None, "errors": sum(not g.ok for g in gens)}
    rows = selfcite_rows(lm, 1 if quick else 3, 2 if quick else 3)
    tokens = sum(len(r) for r, _ in rows)
    dt, got = timed(lambda: lm.score(rows))
    sc = results["scoring"]["selfcite_ablation"]
    out["selfcite_scoring"] = {"wall_s": round(dt, 2), "tokens_per_s": round(tokens / dt, 1),
                               "computed_tokens": lm.last_score_stats["computed_tokens"],
                               "over_tessera_engine": round(tokens / dt / sc["tessera"]["tokens_per_s"], 3)
                               if "tessera" in sc else None}
    print(f"llamacpp workloads: {out['synthesis']} {out['selfcite_scoring']}", flush=True)
    del lm, eng

    # 5. tessera ask on llama.cpp (warm, median of 3) and where its time goes
    if not skip_ask:
        out["ask"] = ask_warm(1 if quick else 3, engine="llamacpp")
        out["ask"]["breakdown"] = ask_breakdown("llamacpp")
        print(f"llamacpp ask: {out['ask']}", flush=True)
    return out


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tessera.config import atomic_savefig

    rows = results["batched"]
    xs = [int(b) for b in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    for name in ("generate", "tessera"):
        ys = [rows[b][name]["tokens_per_s"] for b in rows if name in rows[b]]
        if ys:
            ax.plot(xs[:len(ys)], ys, marker="o", label="model.generate" if name == "generate" else "tessera engine")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size (mixed prompt lengths)")
    ax.set_ylabel("generated tokens / s")
    ax.set_title("SmolLM2-135M greedy generation, 2-core CPU")
    ax.legend()
    ax.grid(alpha=0.3)
    atomic_savefig(fig, path)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="the same code on small sizes (about 2 minutes)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "lm.json"))
    ap.add_argument("--skip-ask", action="store_true")
    args = ap.parse_args()
    t_start = time.perf_counter()
    q = args.quick
    import transformers

    results: dict = {"benchmark": "lm", "quick": q, "machine": machine(),
                     "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                                  **package_versions("tessera")},
                     "config": {"lm": "default (SmolLM2-135M-Instruct, fp32)", "greedy": True}}
    lm = LocalLM.load("default", device="cpu", engine="tessera")
    lm.generate_batch([text_tokens(lm, 16)], max_new_tokens=2)  # warm-up (one-time allocations)

    results["batch1"] = batch1(lm, (64, 512) if q else (64, 512, 1536), 32 if q else 128)
    results["batched"] = batched(lm, (1, 4, 8) if q else (1, 4, 8, 16, 32), 32 if q else 128, 32, 256 if q else 512)
    results["synthesis"] = synth_workload(lm, 8 if q else 32, 8 if q else 16, 16 if q else 48)
    results["scoring"] = scoring(lm, q)
    results["ask"] = None if args.skip_ask else ask_warm(1 if q else 3)
    if results["ask"]:
        results["ask"]["breakdown"] = ask_breakdown("tessera")
    results["profile"] = profiles(lm, q)
    results["llamacpp"] = llamacpp(lm, results, q, args.skip_ask)
    results["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)

    b1 = results["batch1"]["64"]
    top = results["batched"][str(max(int(b) for b in results["batched"]))]
    syn, sc = results["synthesis"], results["scoring"]["selfcite_ablation"]
    results["goals"] = {
        "synth_workload_speedup": goal(3, syn.get("speedup")),
        "batch32_over_generate": goal(1.3, top.get("ratio_tessera_over_generate")),
        "decode_over_generate": goal(1.3, b1.get("decode_ratio_tessera_over_generate")),
        "scoring_speedup": goal(3, sc.get("speedup")),
        "ask_warm_s": goal(5, results["ask"]["wall_s_median"] if results["ask"] else None, higher_is_better=False),
    }
    lc = results["llamacpp"]
    if lc.get("installed"):
        agree = lc["greedy_agreement"]["repacked_q8_0"]["identical_32_tokens"]
        results["goals"].update({
            "decode_over_llamacpp": {**goal(1, lc["batch1"]["tessera_engine_over_llamacpp_decode"]),
                                     "note": "information: tessera's engine (fp32 transformers weights) over llama.cpp"},
            "ask_warm_s_llamacpp": goal(2.5, lc["ask"]["wall_s_median"] if lc.get("ask") else None, higher_is_better=False),
            "wrapper_over_llamacpp": goal(0.9, lc["batch1"]["wrapper_over_direct"]),
            "greedy_agreement": {"target": None, "measured": agree, "met": True,
                                 "note": "information: share of 32 chat prompts whose first 32 greedy tokens are "
                                         "identical on llama.cpp and the transformers model"},
        })
    else:
        results["goals"]["decode_over_llamacpp"] = {"target": 1, "measured": None, "met": False,
                                                    "note": "information only; " + lc["note"]}
    results["wall_s"] = round(time.perf_counter() - t_start, 1)
    results["load_average_at_end"] = os.getloadavg()
    out = Path(args.out)
    write_json(results, out)
    plot(results, out.with_suffix(".png"))
    print(f"wrote {out} in {results['wall_s']} s; goals: {results['goals']}")


if __name__ == "__main__":
    main()
