"""BTX mixing: domain experts (dense Llama-family checkpoints) -> one Hugging Face Mixtral checkpoint.

BTX (Sukhbaatar et al., 2024), Section 3.2 ("MiX"): the feed-forward sublayer of every
expert LLM becomes one expert of a mixture-of-experts layer,

    FF_MoE^l(x) = sum_i g_i(W^l x) FF_i^l(x),

all other parameters (self-attention, embeddings, norms, output head) are averaged,
and the router ``W^l`` is new.  The checkpoint is written in the on-disk Mixtral format
that ``AutoModelForCausalLM.from_pretrained`` reads (and that mergekit, vLLM and
llama.cpp read too)::

    model.layers.L.block_sparse_moe.gate.weight            [E, hidden]
    model.layers.L.block_sparse_moe.experts.N.w1.weight    gate_proj [I, hidden]
    model.layers.L.block_sparse_moe.experts.N.w3.weight    up_proj   [I, hidden]
    model.layers.L.block_sparse_moe.experts.N.w2.weight    down_proj [hidden, I]

transformers 5 converts these while loading (``conversion_mapping.py``: ``block_sparse_moe``
-> ``mlp``; ``w1``/``w3`` stacked and concatenated into ``experts.gate_up_proj [E, 2I, hidden]``;
``w2`` stacked into ``experts.down_proj [E, hidden, I]``), and ``save_pretrained`` writes
the same per-expert names back.

Tensors are streamed from the experts' safetensors files one at a time and written in
shards, so peak memory is about one shard plus one tensor per expert (not the whole
MoE).  The folder is assembled under a temporary name and renamed when complete.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tessera.config import atomic_dir, atomic_file
from tessera.errors import InputError, ModelNotFoundError

ROUTER_INITS = ("normal", "zero", "hidden")
FFN_NAMES = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}  # Llama MLP -> Mixtral expert
ROUTER_SHARD = "model-router.safetensors"


class _Weights:
    """Lazy access to a Hugging Face folder's safetensors weights (single file or sharded index)."""

    def __init__(self, folder: str | Path):
        from safetensors import safe_open

        self.folder = Path(folder)
        single, index = self.folder / "model.safetensors", self.folder / "model.safetensors.index.json"
        if single.is_file():
            self._handles = {single: safe_open(str(single), "pt")}
            self.where = {k: single for k in self._handles[single].keys()}
        elif index.is_file():
            wm = json.loads(index.read_text())["weight_map"]
            self.where = {k: self.folder / v for k, v in wm.items()}
            self._handles = {f: safe_open(str(f), "pt") for f in set(self.where.values())}
        else:
            raise ModelNotFoundError(f"{folder} has no model.safetensors(.index.json); save the expert with save_pretrained (safetensors)")

    def keys(self):
        return self.where.keys()

    def get(self, key: str):
        return self._handles[self.where[key]].get_tensor(key)


def _load_config(folder: Path):
    from transformers import AutoConfig

    if not (folder / "config.json").is_file():
        raise ModelNotFoundError(f"{folder} has no config.json; pass Hugging Face model folders as experts")
    return AutoConfig.from_pretrained(folder)


def _check_compatible(configs, paths) -> None:
    keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size", "hidden_act")
    ref = configs[0]
    if getattr(ref, "attention_bias", False) or getattr(ref, "mlp_bias", False):
        raise InputError(f"{paths[0]} uses attention/MLP biases, which Mixtral does not have; mix Llama-family models without biases")
    if not all(hasattr(ref, k) for k in keys):
        raise InputError(f"{paths[0]} is not a Llama-family model ({ref.model_type}); BTX mixes Llama-architecture experts")
    for c, p in zip(configs[1:], paths[1:]):
        diff = [k for k in keys if getattr(c, k, None) != getattr(ref, k, None)]
        if diff:
            raise InputError(f"{p} differs from {paths[0]} in {', '.join(diff)}; all experts must branch from the same seed")


@dataclass
class MixReport:
    out: str
    num_experts: int
    experts_per_token: int
    expert_sources: list[str]
    variant: str
    router_init: str
    seconds: float
    shards: int
    params: int
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def _expert_ffn_tensors(weights: list[_Weights], layer: int, variant: str, chunks: int):
    """Per MoE expert ``{w1, w2, w3}`` tensors for one layer; see :func:`mix_experts` for the variants."""
    import torch

    ffns = []
    for w in weights:
        p = f"model.layers.{layer}.mlp."
        ffns.append({FFN_NAMES[n]: w.get(p + n + ".weight") for n in FFN_NAMES})
    if variant == "moe":
        return ffns
    if variant == "split":
        out = []
        for f in ffns:
            rows = f["w1"].shape[0]
            size = rows // chunks
            for c in range(chunks):
                sl = slice(c * size, (c + 1) * size)
                out.append({"w1": f["w1"][sl].clone(), "w3": f["w3"][sl].clone(), "w2": f["w2"][:, sl].clone() * chunks})
        return out
    # blend: cut every FFN into len(ffns) chunks; expert j holds chunk j of every FFN
    n = len(ffns)
    size = ffns[0]["w1"].shape[0] // n
    out = []
    for j in range(n):
        sl = slice(j * size, (j + 1) * size)
        out.append({"w1": torch.cat([f["w1"][sl] for f in ffns], 0), "w3": torch.cat([f["w3"][sl] for f in ffns], 0),
                    "w2": torch.cat([f["w2"][:, sl] for f in ffns], 1)})
    return out


def mixtral_config_from(seed_cfg, num_experts: int, experts_per_token: int, intermediate_size: int, **extra):
    """The Mixtral config matching a Llama-family config (same attention, norms, RoPE, vocabulary)."""
    from transformers import MixtralConfig

    rope = getattr(seed_cfg, "rope_parameters", None)
    if rope is None:
        rope = {"rope_type": "default", "rope_theta": getattr(seed_cfg, "rope_theta", 10000.0)}
    cfg = MixtralConfig(
        vocab_size=seed_cfg.vocab_size, hidden_size=seed_cfg.hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=seed_cfg.num_hidden_layers, num_attention_heads=seed_cfg.num_attention_heads,
        num_key_value_heads=seed_cfg.num_key_value_heads, head_dim=getattr(seed_cfg, "head_dim", None),
        hidden_act=seed_cfg.hidden_act, max_position_embeddings=seed_cfg.max_position_embeddings,
        rms_norm_eps=seed_cfg.rms_norm_eps, rope_parameters=dict(rope), tie_word_embeddings=bool(seed_cfg.tie_word_embeddings),
        bos_token_id=seed_cfg.bos_token_id, eos_token_id=seed_cfg.eos_token_id, pad_token_id=seed_cfg.pad_token_id,
        num_local_experts=num_experts, num_experts_per_tok=experts_per_token, sliding_window=None,
        router_aux_loss_coef=0.001, output_router_logits=False, initializer_range=getattr(seed_cfg, "initializer_range", 0.02),
        **extra,
    )
    cfg.architectures = ["MixtralForCausalLM"]
    return cfg


def router_init_tensor(mode: str, num_experts: int, hidden: int, generator=None, dtype=None, std: float = 0.02):
    """A new router weight ``[E, hidden]``: ``normal`` (N(0, std), std 0.02 as in Mixtral/BTX) or ``zero``
    (uniform routing at the start; ties broken by expert index)."""
    import torch

    if mode == "zero":
        return torch.zeros(num_experts, hidden, dtype=dtype)
    return (torch.randn(num_experts, hidden, generator=generator) * std).to(dtype or torch.float32)


def _resolve_expert_paths(experts, seed_model, include_seed: bool, variant: str, router_init: str) -> tuple[list[Path], list[Path]]:
    """Check the mixing options and resolve the expert folders: ``(domain expert paths, FFN source paths)``."""
    if variant not in ("moe", "split", "blend"):
        raise InputError(f"variant={variant!r}; use moe, split or blend")
    if router_init not in ROUTER_INITS:
        raise InputError(f"router_init={router_init!r}; use one of {', '.join(ROUTER_INITS)}")
    paths = [Path(p).expanduser() for p in experts]
    if not paths:
        raise InputError("no experts given; pass at least one expert folder")
    for p in paths:
        if not p.is_dir():
            raise ModelNotFoundError(f"expert folder {p} not found; pass the folders that btx-branch wrote")
    if include_seed:
        if seed_model is None:
            raise InputError("include_seed needs the seed model; pass --seed-model")
        from tessera import hub

        seed_path = Path(hub.resolve_lm(str(seed_model)))
        ffn_paths = paths + [seed_path]
    else:
        ffn_paths = list(paths)
    return paths, ffn_paths


def _expert_layout(inter: int, n_ffn: int, *, variant: str, chunks: int, experts_per_token: int, routing: str,
                   router_init: str, router_prompts) -> tuple[int, int, int]:
    """``(number of MoE experts, expert intermediate size, experts per token)`` for a variant, validated."""
    if variant == "split":
        if chunks < 1 or inter % chunks:
            raise InputError(f"chunks={chunks} must divide intermediate_size={inter}")
        n_exp, i_exp, k = n_ffn * chunks, inter // chunks, experts_per_token * chunks
    elif variant == "blend":
        if inter % n_ffn:
            raise InputError(f"blend needs intermediate_size={inter} divisible by the number of FFNs ({n_ffn})")
        n_exp, i_exp, k = n_ffn, (inter // n_ffn) * n_ffn, experts_per_token
    else:
        n_exp, i_exp, k = n_ffn, inter, experts_per_token
    if routing == "soft":
        k = n_exp
    if not 1 <= k <= n_exp:
        raise InputError(f"experts_per_token={k} must lie in 1..{n_exp} (the number of experts)")
    if router_init == "hidden" and (router_prompts is None or len(router_prompts) != n_exp or not all(router_prompts)):
        raise InputError(f"router_init=hidden needs prompts for each of the {n_exp} experts; pass --prompts or use normal/zero")
    return n_exp, i_exp, k


class _ShardWriter:
    """Collects tensors (cast to ``dtype``) into safetensors shards of about ``shard_bytes`` under ``folder``."""

    def __init__(self, folder: Path, dtype, shard_bytes: int):
        self.folder, self.dtype, self.shard_bytes = folder, dtype, shard_bytes
        self.shard: dict = {}
        self.shard_files: list[tuple[str, list[str]]] = []
        self.size = 0
        self.n_params = 0

    def flush(self) -> None:
        from safetensors.torch import save_file

        if self.shard:
            name = f"part-{len(self.shard_files):05d}.safetensors"
            save_file(self.shard, str(self.folder / name), metadata={"format": "pt"})
            self.shard_files.append((name, list(self.shard)))
            self.shard, self.size = {}, 0

    def put(self, key: str, t) -> None:
        self.shard[key] = t.to(self.dtype).contiguous()
        self.size += t.numel() * t.element_size()
        self.n_params += t.numel()
        if self.size >= self.shard_bytes:
            self.flush()

    def rename_shards(self) -> dict[str, str]:
        """Give the shards their final ``model-i-of-n`` names; the weight map of the tensors written."""
        total = len(self.shard_files)
        weight_map = {}
        for i, (name, keys) in enumerate(self.shard_files):
            final = f"model-{i + 1:05d}-of-{total:05d}.safetensors"
            os.replace(self.folder / name, self.folder / final)
            weight_map.update({k_: final for k_ in keys})
        return weight_map


def _put_averaged_weights(writer: _ShardWriter, weights: list[_Weights], avg_weights: list[_Weights], paths: list[Path]) -> None:
    """Write every non-FFN tensor (attention, embeddings, norms, head) as the mean over the domain experts."""
    import torch

    non_ffn = [k_ for k_ in weights[0].keys() if ".mlp." not in k_ and "rotary_emb" not in k_]
    for key in non_ffn:
        for w, p in zip(avg_weights, paths):
            if key not in w.keys():
                raise InputError(f"{p} lacks tensor {key}; all experts must branch from the same seed")
        acc = avg_weights[0].get(key).to(torch.float32)
        for w in avg_weights[1:]:
            acc += w.get(key).to(torch.float32)
        writer.put(key, acc / len(avg_weights))


def _put_experts_and_routers(writer: _ShardWriter, weights: list[_Weights], n_layers: int, *, variant: str, chunks: int,
                             router_init: str, n_exp: int, hidden: int, gen, router_std: float) -> dict:
    """Write every layer's MoE expert FFNs; return the new routers (written to their own shard later)."""
    router: dict = {}
    for layer in range(n_layers):
        for e, ffn in enumerate(_expert_ffn_tensors(weights, layer, variant, chunks)):
            for name, t in ffn.items():
                writer.put(f"model.layers.{layer}.block_sparse_moe.experts.{e}.{name}.weight", t)
        router[f"model.layers.{layer}.block_sparse_moe.gate.weight"] = router_init_tensor(
            "zero" if router_init == "hidden" else router_init, n_exp, hidden, gen, writer.dtype, router_std)
    return router


def _write_router_and_index(writer: _ShardWriter, router: dict) -> int:
    """Write the router shard and ``model.safetensors.index.json``; the number of shards."""
    import torch
    from safetensors.torch import save_file

    writer.flush()
    for t in router.values():
        writer.n_params += t.numel()
    tmp = writer.folder
    save_file({k_: v.contiguous() for k_, v in router.items()}, str(tmp / ROUTER_SHARD), metadata={"format": "pt"})
    total = len(writer.shard_files)
    weight_map = writer.rename_shards()
    weight_map.update({k_: ROUTER_SHARD for k_ in router})
    total_size = writer.n_params * torch.tensor([], dtype=writer.dtype).element_size()
    index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return total + 1


def _copy_side_files(cfg, src: Path, tmp: Path) -> None:
    """The Mixtral config, the tokenizer and the generation config of the first expert."""
    cfg.save_pretrained(tmp)
    _copy_tokenizer(src, tmp)
    if (src / "generation_config.json").is_file():
        shutil.copy(src / "generation_config.json", tmp / "generation_config.json")


def mix_experts(experts: list[str | Path], out: str | Path, *, seed_model: str | Path | None = None,
                include_seed: bool = False, variant: str = "moe", chunks: int = 2, experts_per_token: int = 2,
                router_init: str = "normal", router_std: float = 0.02, router_prompts: list[list[str]] | None = None,
                routing: str = "topk", shard_bytes: int = 1 << 30, overwrite: bool = False, seed: int = 0) -> MixReport:
    """Mix dense domain experts into a Mixtral checkpoint at ``out`` (BTX Sec. 3.2).

    - ``experts``: Llama-family folders branched from one seed (same shapes);
    - ``include_seed``: add ``seed_model``'s FFN as one more, generalist expert (the paper's
      "BTX with the seed as a 4th expert");  non-FFN weights are averaged over the domain
      experts only (the seed is their common starting point);
    - ``variant``: ``moe`` (one expert per FFN), ``split`` (every FFN cut into ``chunks``
      experts along the hidden units, ``experts_per_token`` multiplied by ``chunks`` so active
      compute stays the same; each chunk's ``w2`` is scaled by ``chunks`` so that routing a
      token evenly over one FFN's chunks reproduces that FFN exactly), or ``blend`` (every FFN
      cut into as many chunks as there are FFNs, expert j = chunk j of every FFN; experts are
      no longer domain-specific; BTX Sec. 4.4 reports it worse);
    - ``router_init``: ``normal`` (N(0, 0.02), default), ``zero``, or ``hidden``: row e of
      layer l's router is the unit-normalised mean input of that MoE layer on
      ``router_prompts[e]`` with every token routed to expert e (as mergekit-moe's
      ``hidden`` gate mode, but measured in the mixed model itself);
    - ``routing``: recorded in the config as ``btx_routing`` (``topk``, ``switch``, ``soft``,
      ``sample``); stock transformers always routes top-k with renormalised weights, which is
      exactly ``topk`` and (with ``experts_per_token = E``) ``soft``; see :mod:`tessera.btx.routing`.
    """
    import torch

    t0 = time.perf_counter()
    paths, ffn_paths = _resolve_expert_paths(experts, seed_model, include_seed, variant, router_init)
    out = Path(out).expanduser()
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise InputError(f"{out} exists and is not empty; pass a new folder (or --overwrite)")
    configs = [_load_config(p) for p in ffn_paths]
    _check_compatible(configs, ffn_paths)
    seed_cfg = configs[0]
    n_exp, i_exp, k = _expert_layout(seed_cfg.intermediate_size, len(ffn_paths), variant=variant, chunks=chunks,
                                     experts_per_token=experts_per_token, routing=routing, router_init=router_init,
                                     router_prompts=router_prompts)

    weights = [_Weights(p) for p in ffn_paths]
    dtype = weights[0].get("model.embed_tokens.weight").dtype
    cfg = mixtral_config_from(seed_cfg, n_exp, k, i_exp, **({"btx_routing": routing} if routing != "topk" else {}))
    gen = torch.Generator().manual_seed(seed)

    with atomic_dir(out) as tmp:
        writer = _ShardWriter(tmp, dtype, shard_bytes)
        _put_averaged_weights(writer, weights, weights[: len(paths)], paths)
        router = _put_experts_and_routers(writer, weights, seed_cfg.num_hidden_layers, variant=variant, chunks=chunks,
                                          router_init=router_init, n_exp=n_exp, hidden=cfg.hidden_size, gen=gen,
                                          router_std=router_std)
        n_shards = _write_router_and_index(writer, router)
        _copy_side_files(cfg, paths[0], tmp)
        if router_init == "hidden":
            hidden_router_init(tmp, router_prompts)
        report = MixReport(out=str(out), num_experts=n_exp, experts_per_token=k, expert_sources=[str(p) for p in ffn_paths],
                           variant=variant, router_init=router_init, seconds=0.0, shards=n_shards, params=writer.n_params,
                           extra={"chunks": chunks if variant == "split" else None, "routing": routing, "include_seed": include_seed})
        report.seconds = time.perf_counter() - t0
        (tmp / "btx_mix.json").write_text(json.dumps(report.to_dict(), indent=2))
    return report


def _copy_tokenizer(src: Path, dst: Path) -> None:
    names = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "vocab.json",
             "merges.txt", "chat_template.jinja", "added_tokens.json")
    copied = False
    for n in names:
        if (src / n).is_file():
            shutil.copy(src / n, dst / n)
            copied = True
    if not copied:
        try:
            from transformers import AutoTokenizer

            AutoTokenizer.from_pretrained(src).save_pretrained(dst)
        except (OSError, ValueError):
            pass


def hidden_router_init(folder: str | Path, prompts: list[list[str]], max_tokens: int = 256) -> None:
    """Set every router from hidden states (mergekit ``hidden`` mode, adapted to BTX).

    For expert e, the prompts ``prompts[e]`` run through the mixed model with every MoE
    layer routed to expert e only; row e of layer l's router becomes the mean over tokens of
    that layer's MoE input (after ``post_attention_layernorm``), scaled to unit norm.
    Only the router shard is rewritten.
    """
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tessera.btx.routing import forced_expert

    folder = Path(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    n_layers = model.config.num_hidden_layers
    rows = torch.zeros(n_layers, model.config.num_local_experts, model.config.hidden_size)
    for e, texts in enumerate(prompts):
        sums = torch.zeros(n_layers, model.config.hidden_size)
        count = 0
        captured: dict[int, torch.Tensor] = {}
        hooks = [layer.mlp.register_forward_pre_hook(lambda m, a, i=i: captured.__setitem__(i, a[0].detach()))
                 for i, layer in enumerate(model.model.layers)]
        try:
            with forced_expert(model, e), torch.inference_mode():
                for text in texts:
                    ids = tok(text, return_tensors="pt", truncation=True, max_length=max_tokens)["input_ids"]
                    if ids.shape[1] == 0:
                        continue
                    model(input_ids=ids)
                    for i in range(n_layers):
                        sums[i] += captured[i].reshape(-1, model.config.hidden_size).sum(0)
                    count += ids.shape[1]
        finally:
            for h in hooks:
                h.remove()
        if count == 0:
            raise InputError(f"router prompts for expert {e} are empty; give each expert non-empty prompts")
        mean = sums / count
        rows[:, e] = mean / mean.norm(dim=-1, keepdim=True).clamp_min(1e-6)
    dtype = next(model.parameters()).dtype
    with atomic_file(folder / ROUTER_SHARD) as tmp:
        save_file({f"model.layers.{i}.block_sparse_moe.gate.weight": rows[i].to(dtype).contiguous()
                   for i in range(n_layers)}, str(tmp), metadata={"format": "pt"})
