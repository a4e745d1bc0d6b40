"""The training loop for our own modules: plain PyTorch, readable top to bottom.

- :func:`init_distributed`: under ``torchrun`` (``WORLD_SIZE > 1``) joins the process group
  (NCCL on GPU, gloo on CPU); picks ``cuda:LOCAL_RANK`` when CUDA is present, else CPU.
- :func:`wrap_model`: DDP (CPU or GPU) or FSDP2 (``fully_shard`` on every block, then the root; GPU).
- :func:`train_loop`: AdamW step with warm-up + cosine learning rate, gradient clipping, bf16
  autocast on GPU (fp32 on CPU), cumulative FLOPs counted by a caller-given function, a callback
  per step (logging, evaluation, checkpoints).
- :func:`save_checkpoint` / :func:`load_checkpoint`: full (unsharded) model and optimizer state via
  ``torch.distributed.checkpoint.state_dict`` (works for plain, DDP and FSDP models), written as a
  folder of safetensors files and JSON (no pickle), built under a temporary name and renamed.

The model's ``forward(batch)`` returns a dict with ``"loss"`` (so DDP sees the whole graph).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = "cpu"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str = "") -> DistInfo:
    """Join the process group when launched by torchrun; ``device`` "" = CUDA when present, else CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if not device else device.startswith("cuda")
    dev = (f"cuda:{local}" if use_cuda else "cpu") if not device or device == "cuda" else device
    if world > 1 and not dist.is_initialized():
        if use_cuda:
            torch.cuda.set_device(local)
        dist.init_process_group("nccl" if use_cuda else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    return DistInfo(rank, world, local, dev)


def resolve_strategy(info: DistInfo, strategy: str = "auto") -> str:
    """What :func:`wrap_model` does for ``strategy``: ``none`` (one process), ``ddp`` or ``fsdp`` (``auto``: FSDP on
    CUDA, DDP on CPU); other names are passed through for :func:`wrap_model` to refuse."""
    if info.world_size == 1 or strategy == "none":
        return "none"
    if strategy == "auto":
        return "fsdp" if info.device.startswith("cuda") else "ddp"
    return strategy


def wrap_model(model: nn.Module, info: DistInfo, strategy: str = "auto", find_unused_parameters: bool = False,
               blocks: list[nn.Module] | None = None) -> nn.Module:
    """DDP / FSDP wrapping (single process: the model unchanged).

    ``strategy``: ``auto`` (FSDP on CUDA, DDP on CPU), ``ddp``, ``fsdp``, ``none``.  FSDP2 shards every
    module in ``blocks`` (e.g. the transformer layers) and then the root.
    """
    strategy = resolve_strategy(info, strategy)
    if strategy == "none":
        return model
    if strategy == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
            if info.device.startswith("cuda") else MixedPrecisionPolicy()
        for b in blocks or []:
            fully_shard(b, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
        return model
    if strategy != "ddp":
        raise ValueError(f"unknown distributed strategy {strategy!r}; use auto, ddp, fsdp or none")
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [info.local_rank] if info.device.startswith("cuda") else None
    return DDP(model, device_ids=ids, find_unused_parameters=find_unused_parameters)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") and isinstance(model, nn.parallel.DistributedDataParallel) else model


def cosine_lr(step: int, total: int, base: float, warmup: int = 0, min_ratio: float = 0.1) -> float:
    """Linear warm-up, then cosine decay to ``min_ratio * base``."""
    if warmup and step < warmup:
        return base * (step + 1) / warmup
    prog = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * prog)))


@dataclass
class LoopState:
    """What a checkpoint needs to resume: the next step and the running totals."""

    step: int = 0
    flops: float = 0.0
    tokens: int = 0
    train_seconds: float = 0.0
    step_times: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def train_loop(model: nn.Module, optimizer: torch.optim.Optimizer, get_batch: Callable[[int], dict], steps: int,
               state: LoopState, info: DistInfo, flops_fn: Callable[[dict], float] | None = None,
               lr_fn: Callable[[int], float] | None = None, grad_clip: float = 1.0,
               on_step: Callable[[LoopState, dict, float], bool | None] | None = None) -> LoopState:
    """Run steps ``state.step .. steps - 1``.

    Each step: ``batch = get_batch(step)`` (this rank's batch), ``model(batch)["loss"]`` backward,
    clip, optimizer step.  ``flops_fn(batch)`` is this rank's training FLOPs; the state counts the
    global total (x world size).  ``on_step(state, logs, seconds)`` runs after each step with the
    float values of the model's output dict; when it returns ``True`` the loop stops after that step.
    """
    model.train()
    cuda = info.device.startswith("cuda")
    while state.step < steps:
        step = state.step
        batch = {k: v.to(info.device, non_blocking=True) for k, v in get_batch(step).items()}
        if lr_fn is not None:
            for group in optimizer.param_groups:
                group["lr"] = lr_fn(step)
        t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            out = model(batch)
        optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        if cuda:
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        state.step = step + 1
        state.train_seconds += dt
        state.step_times.append(round(dt, 5))
        state.tokens += int(batch["tokens"].numel()) * info.world_size
        if flops_fn is not None:
            state.flops += flops_fn(batch) * info.world_size
        if on_step is not None and on_step(state, {k: float(v.detach()) for k, v in out.items()}, dt):
            break
    return state


def _state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer | None):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    msd = get_model_state_dict(model, options=opts)
    osd = get_optimizer_state_dict(model, optimizer, options=opts) if optimizer is not None else None
    return msd, osd


def save_checkpoint(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None, state: LoopState,
                    extra: dict | None = None, is_main: bool = True, averaged: nn.Module | None = None) -> None:
    """Full model + optimizer state, the loop state and the RNG states, as a checkpoint folder
    (safetensors + JSON, :mod:`tessera.train.checkpoint`); every rank must call it (FSDP gathers),
    rank 0 writes.  ``averaged``: a weight average kept beside the model (:func:`tessera.train.ema.weight_ema`),
    saved with it."""
    from tessera.train.checkpoint import gathered_rng_states, write_checkpoint

    msd, osd = _state_dicts(model, optimizer)
    rng = gathered_rng_states()  # every rank's RNG states
    if not is_main:
        return
    avg = {k: v.detach().cpu() for k, v in averaged.state_dict().items()} if averaged is not None else None
    write_checkpoint(path, msd, osd, state.to_dict(), extra or {}, rng=rng, averaged=avg)


def load_checkpoint(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    restore_rng: bool = True, averaged: nn.Module | None = None) -> tuple[LoopState, dict]:
    """Load what :func:`save_checkpoint` wrote into ``model`` (and ``optimizer``, and ``averaged``: the weight
    average saved beside the model; a checkpoint without one is refused); returns ``(state, extra)``.

    Nothing is unpickled: a pickle or a damaged folder raises a one-line ``InputError``."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    from tessera.train.checkpoint import read_checkpoint

    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    ck = read_checkpoint(path, restore_rng=restore_rng, rank=rank, averaged=averaged is not None)
    set_model_state_dict(model, ck["model"], options=StateDictOptions(full_state_dict=True))
    if optimizer is not None and ck.get("optimizer") is not None:
        # a parameter that never had a gradient (an expert no token reached yet) has no optimizer
        # state to restore: that is the only mismatch allowed (strict=False); unknown names are refused
        names = {n for n, _ in unwrap(model).named_parameters()}
        unknown = sorted(str(k) for k in ck["optimizer"]["state"] if isinstance(k, str) and k not in names)
        if unknown:
            from tessera.errors import InputError

            raise InputError(f"{path}: optimizer state for parameters this model lacks ({unknown[0]}, ...); "
                             "resume with the same model config or rerun with resume=false")
        # the saved param groups carry the implementation flags of the run that saved them (fused AdamW on plain
        # tensors); this run's choice stands, e.g. the default implementation for FSDP2's DTensors
        impl = [{k: g[k] for k in ("fused", "foreach") if k in g} for g in optimizer.param_groups]
        set_optimizer_state_dict(model, optimizer, ck["optimizer"],
                                 options=StateDictOptions(full_state_dict=True, strict=False))
        for g, flags in zip(optimizer.param_groups, impl):
            g.update(flags)
    if averaged is not None:
        from tessera.errors import InputError

        if ck.get("averaged") is None:
            raise InputError(f"{path} holds no weight average (the run that saved it kept none); resume with the "
                             "same settings (e.g. ema_decay=0) or rerun with resume=false")
        try:
            averaged.load_state_dict(ck["averaged"])
        except RuntimeError as e:
            raise InputError(f"{path}: the saved weight average does not fit this model ({str(e).splitlines()[0]}); "
                             "resume with the same model config or rerun with resume=false") from None
    return LoopState(**ck["state"]), ck.get("extra", {})
