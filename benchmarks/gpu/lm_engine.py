"""GPU check of tessera's LM engine (``tessera.lm.engine``) on CUDA: a seeded random Llama in bf16 and fp32.

Checks what the CPU suite cannot: the engine's CUDA path (bf16 KV buffers, masks and generators on the
device, autocast), greedy agreement with ``model.generate``, scoring against transformers' padded forward,
and tokens/s of both at batch 1 and 32.  Needs only torch and transformers (no tessera install, no model
download): ``PYTHONPATH=src python3 benchmarks/gpu/lm_engine.py --out $OUT/lm_engine_gpu.json``.
"""

from __future__ import annotations

import argparse
import json
import time

import torch


class Tok:
    """The few tokenizer attributes LocalLM reads for token-id prompts."""

    eos_token_id = 2
    pad_token_id = 0
    chat_template = None

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


def build(dtype, layers: int, hidden: int, device: str = "cuda"):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=hidden * 8 // 3, num_hidden_layers=layers,
                      num_attention_heads=hidden // 64, num_key_value_heads=max(1, hidden // 192),
                      max_position_embeddings=4096, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return LlamaForCausalLM(cfg).to(device, dtype).eval()


def prompts(n: int, lo: int, hi: int, seed: int, shared: int = 0):
    g = torch.Generator().manual_seed(seed)
    head = torch.randint(3, 32000, (shared,), generator=g).tolist()
    return [head + torch.randint(3, 32000, (int(torch.randint(lo, hi + 1, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn):
    sync()
    t = time.perf_counter()
    out = fn()
    sync()
    return time.perf_counter() - t, out


def main() -> None:
    from tessera.lm.local import LocalLM

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--new-tokens", type=int, default=128)
    args = ap.parse_args()
    dev = args.device
    res: dict = {"device": torch.cuda.get_device_name() if dev == "cuda" else dev, "torch": torch.__version__}
    import transformers

    res["transformers"] = transformers.__version__
    for dtype in (torch.float32, torch.bfloat16) if dev == "cuda" else (torch.float32,):
        name = str(dtype).split(".")[-1]
        model = build(dtype, args.layers, args.hidden, dev)
        lm = LocalLM(model, Tok(), name=f"random-llama-{name}")
        r: dict = {"engine_default": lm.engine}
        P = prompts(32, 32, 512, 0, shared=128)
        lm.generate_batch(P[:2], max_new_tokens=4)
        lm.generate_batch(P[:2], max_new_tokens=4, engine="hf")
        for B in (1, 32):
            t_ours, ours = timed(lambda: lm.generate_batch(P[:B], max_new_tokens=args.new_tokens, engine="tessera"))
            t_hf, ref = timed(lambda: lm.generate_batch(P[:B], max_new_tokens=args.new_tokens, engine="hf"))
            n = sum(len(o.token_ids) for o in ours)
            first_diff = [next((i for i, (a, b) in enumerate(zip(o.token_ids, f.token_ids)) if a != b), None)
                          for o, f in zip(ours, ref)]
            r[f"batch{B}"] = {"tessera_tokens_per_s": round(n / t_ours, 1),
                              "generate_tokens_per_s": round(sum(len(f.token_ids) for f in ref) / t_hf, 1),
                              "rows_identical": sum(o.token_ids == f.token_ids for o, f in zip(ours, ref)) / B,
                              "first_divergence": first_diff}
        rows = [(p, 16) for p in P[:16]]
        t_s, s_ours = timed(lambda: lm.score(rows, batch_size=8, engine="tessera"))
        t_h, s_ref = timed(lambda: lm.score(rows, batch_size=8, engine="hf"))
        r["score"] = {"max_abs_diff": max(abs(a - b) for x, y in zip(s_ours, s_ref) for a, b in zip(x, y)),
                      "tessera_s": round(t_s, 3), "hf_s": round(t_h, 3)}
        with torch.autocast(dev, dtype=torch.bfloat16):
            out = lm.generate_batch(P[:4], max_new_tokens=8, engine="tessera")
            sampled = lm.generate_batch(P[:4], max_new_tokens=8, temperature=1.0, seed=3)
        r["autocast_ok"] = all(len(o.token_ids) <= 8 for o in out + sampled)
        res[name] = r
        print(name, json.dumps(r), flush=True)
        del model, lm
        if dev == "cuda":
            torch.cuda.empty_cache()
    with open(args.out, "w") as f:
        json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
