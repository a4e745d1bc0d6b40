"""DRAMA-style structured pruning of a Llama-family checkpoint to a target size.

DRAMA (its pruning stage; PAPERS.md) prunes Llama to 0.1B/0.3B/1B non-embedding
parameters with structured, Sheared-LLaMA-style pruning before contrastive
training; its exact procedure is not public.  We use activation-based importance
on calibration text, in two passes, and no learned masks:

1. **Depth.**  Each decoder layer's *block influence* (ShortGPT, Men et al. 2024,
   "Block Influence"): ``BI_l = 1 - E_t cos(x_l,t, x_{l+1},t)``, the mean over calibration tokens
   of one minus the cosine similarity between the layer's input and output hidden
   states.  The layers with the lowest BI change the residual stream least and are
   dropped (the first and last layer are kept by default: removing them hurts most in
   layer-pruning studies).
2. **Width**, measured again on the depth-pruned model:
   - FFN channels: ``E_t |a_j| * ||W_down[:, j]||_2`` with ``a = act(gate(x)) * up(x)``,
     the input of ``down_proj`` (the magnitude of each channel's contribution to the
     output, Wanda-style);
   - attention: whole GQA groups (one key/value head and the query heads that share
     it), scored by ``sum_h E_t ||W_o[:, h] o_h,t||_2``, each head's contribution to the
     residual stream, so grouping stays valid.
   Every layer keeps the same number of channels and groups (Llama configs have one
   shape for all layers), each layer its own most important ones.

:func:`plan_architecture` picks the shape: ``depth_share`` of the size reduction
(on a log scale) goes to depth, the rest to width, attention groups are rounded to
whole groups and the FFN width (a multiple of 8) absorbs the remainder, so the
result lands within a fraction of a percent of the target.

The output is an ordinary checkpoint of the same class (``LlamaForCausalLM``) with
an updated config (``num_hidden_layers``, ``intermediate_size``,
``num_attention_heads``, ``num_key_value_heads``, an explicit ``head_dim``), which
``AutoModel.from_pretrained`` loads, plus the tokenizer.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tessera.config import atomic_dir
from tessera.errors import EmptyCorpusError, InputError, ModelNotFoundError

log = logging.getLogger(__name__)

EMBEDDING_NAMES = ("embed_tokens", "lm_head", "wte", "wpe", "embed_positions")


# --------------------------------------------------------------------- parameter counts


def non_embedding_params(model) -> int:
    """Parameters outside the token embeddings and the LM head (tied or not)."""
    seen, n = set(), 0
    for name, p in model.named_parameters():
        if id(p) in seen or any(e in name for e in EMBEDDING_NAMES):
            continue
        seen.add(id(p))
        n += p.numel()
    return n


def _head_dim(cfg) -> int:
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def layer_params(cfg, n_groups: int | None = None, intermediate: int | None = None) -> int:
    """Parameters of one Llama decoder layer with ``n_groups`` KV groups and FFN width ``intermediate``."""
    H, hd = cfg.hidden_size, _head_dim(cfg)
    q_per_kv = cfg.num_attention_heads // cfg.num_key_value_heads
    g = cfg.num_key_value_heads if n_groups is None else n_groups
    i = cfg.intermediate_size if intermediate is None else intermediate
    nq, nkv = g * q_per_kv, g
    attn = H * hd * nq + 2 * H * hd * nkv + nq * hd * H
    if getattr(cfg, "attention_bias", False):
        attn += hd * nq + 2 * hd * nkv + H
    mlp = 3 * H * i + ((2 * i + H) if getattr(cfg, "mlp_bias", False) else 0)
    return attn + mlp + 2 * H  # two RMSNorms


def config_non_embedding_params(cfg, n_layers=None, n_groups=None, intermediate=None) -> int:
    """Non-embedding parameters of a Llama config (optionally with a pruned shape)."""
    L = cfg.num_hidden_layers if n_layers is None else n_layers
    return L * layer_params(cfg, n_groups, intermediate) + cfg.hidden_size  # + final norm


@dataclass
class PrunePlan:
    num_hidden_layers: int
    num_key_value_heads: int
    num_attention_heads: int
    intermediate_size: int
    non_embedding_params: int
    target: int

    @property
    def rel_error(self) -> float:
        return (self.non_embedding_params - self.target) / self.target


def plan_architecture(cfg, target: int, depth_share: float = 0.5, multiple: int = 8, tolerance: float = 0.01) -> PrunePlan:
    """The pruned shape closest to ``target`` non-embedding parameters.

    ``depth_share`` in [0, 1] is the share of the reduction, on a log scale, taken by
    depth: the ideal layer count is ``L * ratio ** depth_share`` (1 = layers only,
    0 = width only).  Around it, the first layer count whose widths can meet the
    target within ``tolerance`` wins; attention keeps the valid number of whole GQA
    groups nearest ``groups * width`` and the FFN width (a multiple of ``multiple``) takes up the rest.
    """
    full = config_non_embedding_params(cfg)
    if not 0 < target <= full:
        raise InputError(f"target of {target:,} non-embedding parameters must lie in 1..{full:,} (the model's size)")
    if not 0.0 <= depth_share <= 1.0:
        raise InputError(f"depth_share must lie in [0, 1], got {depth_share}")
    L, H, G, I = cfg.num_hidden_layers, cfg.hidden_size, cfg.num_key_value_heads, cfg.intermediate_size
    q_per_kv = cfg.num_attention_heads // G
    # transformers' LlamaConfig insists on hidden_size % num_attention_heads == 0 (even with an
    # explicit head_dim), so only group counts that satisfy it give a loadable checkpoint
    valid = [g for g in range(1, G + 1) if H % (g * q_per_kv) == 0]
    ratio = target / full
    ideal = L * ratio ** depth_share
    best: PrunePlan | None = None
    for n in sorted(range(1, L + 1), key=lambda k: (abs(k - ideal), k)):
        budget = (target - H) / n
        width = budget / layer_params(cfg)
        g = min(valid, key=lambda v: (abs(v - G * width), -v))
        rest = budget - layer_params(cfg, g, 0)
        i = int(round(rest / (3 * H + (2 if getattr(cfg, "mlp_bias", False) else 0)) / multiple)) * multiple
        i = min(I, max(multiple, i))
        plan = PrunePlan(n, g, g * q_per_kv, i, config_non_embedding_params(cfg, n, g, i), target)
        if best is None or abs(plan.rel_error) < abs(best.rel_error):
            best = plan
        if abs(plan.rel_error) <= tolerance:
            return plan
    return best


# --------------------------------------------------------------------- calibration


def calibration_texts(source: str = "wikitext2", max_docs: int | None = None) -> list[str]:
    """Calibration text: ``wikitext2`` (the shared WikiText-2 test set, falling back to
    Python's docs when the shared data is absent), ``python-docs``, or a file/folder."""
    from tessera.data.paths import shared_data_dir
    from tessera.data.text import load_corpus, python_docs_corpus, read_wikitext

    if source == "wikitext2":
        root = shared_data_dir()
        path = root / "wikitext2" / "wiki.test.raw" if root else None
        docs = read_wikitext(path) if path is not None and path.is_file() else python_docs_corpus()
    elif source == "python-docs":
        docs = python_docs_corpus()
    else:
        p = Path(source).expanduser()
        if not p.exists():
            raise InputError(f"calibration source {source} not found; use 'wikitext2', 'python-docs' or a text file/folder")
        docs = load_corpus(p)
    texts = [d.full_text for d in docs if d.text.strip()]
    if not texts:
        raise EmptyCorpusError(f"calibration source {source} has no text")
    return texts[:max_docs] if max_docs else texts


def calibration_batch(tokenizer, texts: list[str], n_samples: int = 32, seq_len: int = 256, offset: int = 0):
    """``(n_samples, seq_len)`` token ids cut from the concatenated texts (no padding), skipping
    the first ``offset`` chunks (so held-out chunks can follow the calibration ones)."""
    import torch

    need = (offset + n_samples) * seq_len
    ids: list[int] = []
    sep = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for t in texts:
        ids.extend(tokenizer(t, add_special_tokens=False)["input_ids"] + sep)
        if len(ids) >= need:
            break
    n = min(n_samples, len(ids) // seq_len - offset)
    if n < 1:
        raise EmptyCorpusError(f"calibration text has {len(ids)} tokens, too few for one chunk of {seq_len} after {offset} chunks; "
                               "use more text or a shorter seq_len")
    start = offset * seq_len
    return torch.tensor(ids[start:start + n * seq_len]).view(n, seq_len)


def _layers(model):
    inner = getattr(model, "model", model)
    if not hasattr(inner, "layers"):
        raise InputError(f"{type(model).__name__} has no decoder layers; pass a Llama-family checkpoint")
    return inner.layers


def _run(model, ids, batch_size: int):
    import torch

    with torch.inference_mode():
        for b in range(0, ids.shape[0], batch_size):
            model(input_ids=ids[b:b + batch_size])


def layer_importance(model, ids, batch_size: int = 4) -> list[float]:
    """Block influence per layer (ShortGPT's Block Influence): ``1 - mean_t cos(input_t, output_t)``."""
    import torch

    layers = _layers(model)
    sums = [0.0] * len(layers)
    count = [0] * len(layers)
    inputs: dict[int, torch.Tensor] = {}
    handles = []

    def pre(idx):
        def hook(module, args, kwargs):
            inputs[idx] = args[0] if args else kwargs["hidden_states"]
        return hook

    def post(idx):
        def hook(module, args, kwargs, output):
            out = output[0] if isinstance(output, tuple) else output
            cos = torch.nn.functional.cosine_similarity(inputs.pop(idx).float(), out.float(), dim=-1)
            sums[idx] += float((1 - cos).sum())
            count[idx] += cos.numel()
        return hook

    for i, layer in enumerate(layers):
        handles.append(layer.register_forward_pre_hook(pre(i), with_kwargs=True))
        handles.append(layer.register_forward_hook(post(i), with_kwargs=True))
    try:
        _run(model, ids, batch_size)
    finally:
        for h in handles:
            h.remove()
    return [s / max(c, 1) for s, c in zip(sums, count)]


def width_importance(model, ids, batch_size: int = 4) -> tuple[list, list]:
    """Per layer: FFN channel scores ``(intermediate,)`` and KV-group scores ``(num_kv_heads,)``."""
    import torch

    layers = _layers(model)
    cfg = model.config
    hd, nh, nkv = _head_dim(cfg), cfg.num_attention_heads, cfg.num_key_value_heads
    ffn = [torch.zeros(layer.mlp.down_proj.in_features, dtype=torch.float64) for layer in layers]
    heads = [torch.zeros(nh, dtype=torch.float64) for _ in layers]
    ntok = [0]
    handles = []

    def ffn_hook(idx):
        def hook(module, args):
            a = args[0].float()
            ffn[idx] += a.abs().sum(dim=(0, 1)).double()
            if idx == 0:
                ntok[0] += a.shape[0] * a.shape[1]
        return hook

    def head_hook(idx):
        def hook(module, args):
            x = args[0].float()  # (B, T, nh * hd), the heads' outputs before o_proj
            B, T, _ = x.shape
            xh = x.view(B, T, nh, hd)
            w = module.weight.float().view(module.out_features, nh, hd)  # (H, nh, hd)
            contrib = torch.einsum("btnd,hnd->btnh", xh, w)  # each head's share of the output
            heads[idx] += contrib.norm(dim=-1).sum(dim=(0, 1)).double()
        return hook

    for i, layer in enumerate(layers):
        handles.append(layer.mlp.down_proj.register_forward_pre_hook(ffn_hook(i)))
        handles.append(layer.self_attn.o_proj.register_forward_pre_hook(head_hook(i)))
    try:
        _run(model, ids, batch_size)
    finally:
        for h in handles:
            h.remove()
    n = max(ntok[0], 1)
    ffn_scores = [(f / n) * layer.mlp.down_proj.weight.detach().double().norm(dim=0) for f, layer in zip(ffn, layers)]
    q_per_kv = nh // nkv
    group_scores = [(h / n).view(nkv, q_per_kv).sum(dim=1) for h in heads]
    return ffn_scores, group_scores


def lm_loss(model, ids, batch_size: int = 4) -> float:
    """Mean next-token cross-entropy on ``ids`` (a quick check of what pruning costs)."""
    import torch

    total, n = 0.0, 0
    with torch.inference_mode():
        for b in range(0, ids.shape[0], batch_size):
            x = ids[b:b + batch_size]
            out = model(input_ids=x, labels=x)
            total += float(out.loss) * x.shape[0]
            n += x.shape[0]
    return total / max(n, 1)


# --------------------------------------------------------------------- surgery


def _pruned_config(cfg, keep_layers: list[int], plan: PrunePlan):
    d = cfg.to_dict()
    L = cfg.num_hidden_layers
    for k, v in list(d.items()):  # per-layer lists (e.g. layer_types) follow the kept layers
        if isinstance(v, list) and len(v) == L and k not in ("architectures",):
            d[k] = [v[i] for i in keep_layers]
    d.update(num_hidden_layers=len(keep_layers), num_attention_heads=plan.num_attention_heads,
             num_key_value_heads=plan.num_key_value_heads, intermediate_size=plan.intermediate_size,
             head_dim=_head_dim(cfg))
    d.pop("_name_or_path", None)
    return type(cfg).from_dict(d)


def apply_pruning(model, keep_layers: list[int], ffn_keep: list, group_keep: list, plan: PrunePlan):
    """A new model of the same class holding only the kept layers, channels and KV groups."""
    import torch

    cfg = model.config
    hd, nh, nkv = _head_dim(cfg), cfg.num_attention_heads, cfg.num_key_value_heads
    q_per_kv = nh // nkv
    new_cfg = _pruned_config(cfg, keep_layers, plan)
    old = model.state_dict()
    new = {}
    for name, t in old.items():
        if ".layers." not in name:
            new[name] = t
    prefix = name_prefix(model)
    for k, i in enumerate(keep_layers):
        src, dst = f"{prefix}layers.{i}.", f"{prefix}layers.{k}."
        ch = torch.as_tensor(sorted(ffn_keep[k]))
        groups = sorted(group_keep[k])
        q_rows = torch.cat([torch.arange((g * q_per_kv) * hd, (g + 1) * q_per_kv * hd) for g in groups])
        kv_rows = torch.cat([torch.arange(g * hd, (g + 1) * hd) for g in groups])
        for name, t in old.items():
            if not name.startswith(src):
                continue
            rest = name[len(src):]
            if rest.startswith(("mlp.gate_proj.", "mlp.up_proj.")):
                t = t[ch]
            elif rest == "mlp.down_proj.weight":
                t = t[:, ch]
            elif rest.startswith("self_attn.q_proj."):
                t = t[q_rows]
            elif rest.startswith(("self_attn.k_proj.", "self_attn.v_proj.")):
                t = t[kv_rows]
            elif rest == "self_attn.o_proj.weight":
                t = t[:, q_rows]
            new[dst + rest] = t.clone()
    pruned = type(model)(new_cfg)
    missing, unexpected = pruned.load_state_dict(new, strict=False)
    missing = [m for m in missing if not m.endswith("lm_head.weight") or not new_cfg.tie_word_embeddings]
    if missing or unexpected:
        raise RuntimeError(f"pruned state dict does not match the new config: missing {missing[:4]}, unexpected {unexpected[:4]}")
    if getattr(new_cfg, "tie_word_embeddings", False):
        pruned.tie_weights()
    pruned.generation_config = model.generation_config
    return pruned.eval()


def name_prefix(model) -> str:
    """``model.`` for ``*ForCausalLM`` (the decoder lives under ``.model``), else empty."""
    return "model." if any(n.startswith("model.layers.") for n, _ in model.named_parameters()) else ""


# --------------------------------------------------------------------- the whole procedure


@dataclass
class PruneReport:
    source: str
    target: int
    plan: dict
    params_before: dict
    params_after: dict
    kept_layers: list[int]
    layer_importance: list[float]
    config_before: dict
    config_after: dict
    calibration: dict
    lm_loss_before: float | None = None
    lm_loss_after: float | None = None
    times: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def load_causal_lm(spec: str):
    """A Llama-family causal LM and its tokenizer (fp32, eval mode) from a spec."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tessera.hub import _local_only, _quiet_transformers, resolve_lm

    _quiet_transformers()
    path = resolve_lm(spec)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, local_files_only=_local_only())
        tok = AutoTokenizer.from_pretrained(path, local_files_only=_local_only())
    except (OSError, ValueError) as e:
        raise ModelNotFoundError(f"could not load {spec} as a causal LM ({str(e).splitlines()[0][:160]}); pass a Llama-family model folder") from None
    needed = ("num_key_value_heads", "intermediate_size", "num_hidden_layers")
    if not all(hasattr(model.config, k) for k in needed) or not hasattr(getattr(model, "model", model), "layers"):
        raise InputError(f"{spec} ({model.config.model_type}) is not a Llama-family model; pruning needs q/k/v/o and gate/up/down projections")
    return model.eval(), tok, path


def prune(
    spec: str = "default",
    target_params: int | None = None,
    target_ratio: float | None = None,
    depth_share: float = 0.5,
    calibration: str = "wikitext2",
    n_samples: int = 32,
    seq_len: int = 256,
    eval_samples: int = 8,
    keep_first_last: bool = True,
    batch_size: int = 4,
    seed: int = 0,
):
    """Prune a causal LM to ``target_params`` non-embedding parameters (or ``target_ratio`` of them).

    Returns ``(pruned_model, tokenizer, PruneReport)``.  Calibration: ``n_samples`` chunks
    of ``seq_len`` tokens (scaled down for CPU; Sheared-LLaMA-style pruning uses far
    more); the LM loss on the next ``eval_samples`` chunks is reported before and after.
    """
    import torch

    torch.manual_seed(seed)
    times = {}
    t0 = time.perf_counter()
    model, tok, path = load_causal_lm(spec)
    cfg = model.config
    full = non_embedding_params(model)
    target_params = target_from(full, target_params, target_ratio)
    plan = plan_architecture(cfg, int(target_params), depth_share=depth_share)
    texts = calibration_texts(calibration)
    ids = calibration_batch(tok, texts, n_samples=n_samples, seq_len=seq_len)
    held = calibration_batch(tok, texts, n_samples=eval_samples, seq_len=seq_len, offset=ids.shape[0]) if eval_samples else None
    times["load_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    bi = layer_importance(model, ids, batch_size)
    L = cfg.num_hidden_layers
    protected = {0, L - 1} if keep_first_last and plan.num_hidden_layers >= 2 else set()
    order = sorted((i for i in range(L) if i not in protected), key=lambda i: bi[i], reverse=True)
    keep_layers = sorted(list(protected) + order[: plan.num_hidden_layers - len(protected)])
    times["depth_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    full_width = [set(range(cfg.intermediate_size))] * len(keep_layers)
    all_groups = [set(range(cfg.num_key_value_heads))] * len(keep_layers)
    depth_plan = PrunePlan(len(keep_layers), cfg.num_key_value_heads, cfg.num_attention_heads, cfg.intermediate_size, 0, plan.target)
    shallow = apply_pruning(model, keep_layers, full_width, all_groups, depth_plan)
    ffn_scores, group_scores = width_importance(shallow, ids, batch_size)
    ffn_keep = [set(torch.topk(s, plan.intermediate_size).indices.tolist()) for s in ffn_scores]
    group_keep = [set(torch.topk(s, plan.num_key_value_heads).indices.tolist()) for s in group_scores]
    pruned = apply_pruning(shallow, list(range(len(keep_layers))), ffn_keep, group_keep, plan)
    times["width_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    loss_before = lm_loss(model, held, batch_size) if held is not None else None
    loss_after = lm_loss(pruned, held, batch_size) if held is not None else None
    times["eval_s"] = time.perf_counter() - t0

    after = non_embedding_params(pruned)
    report = PruneReport(
        source=str(path),
        target=int(target_params),
        plan=asdict(plan) | {"rel_error": (after - plan.target) / plan.target, "depth_share": depth_share},
        params_before={"non_embedding": full, "total": sum(p.numel() for p in model.parameters())},
        params_after={"non_embedding": after, "total": sum(p.numel() for p in pruned.parameters())},
        kept_layers=keep_layers,
        layer_importance=[round(b, 6) for b in bi],
        config_before=_shape(cfg),
        config_after=_shape(pruned.config),
        calibration={"source": calibration, "n_samples": int(ids.shape[0]), "seq_len": seq_len, "eval_samples": int(held.shape[0]) if held is not None else 0},
        lm_loss_before=loss_before,
        lm_loss_after=loss_after,
        times={k: round(v, 2) for k, v in times.items()},
    )
    return pruned, tok, report


def _shape(cfg) -> dict:
    return {k: getattr(cfg, k, None) for k in ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
                                                "num_key_value_heads", "head_dim", "vocab_size")}


def save_pruned(model, tokenizer, out_dir: str | Path, report: PruneReport | None = None) -> Path:
    """Write the checkpoint (safetensors + config + tokenizer) under a temporary name, then rename."""
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise InputError(f"{out} exists and is not empty; pass a new folder for the pruned model")
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if report is not None:
            (tmp / "tessera_pruning.json").write_text(json.dumps(report.to_dict(), indent=2))
    return out


def target_from(full: int, target_params: int | None, target_ratio: float | None) -> int:
    if target_params:
        return int(target_params)
    if target_ratio and 0 < target_ratio <= 1:
        return int(math.floor(full * target_ratio + 0.5))
    raise InputError("give target_params (a parameter count) or target_ratio in (0, 1], e.g. target_ratio=0.2")
