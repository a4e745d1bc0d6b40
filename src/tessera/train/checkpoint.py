"""Checkpoints that cannot run code: a folder of safetensors files and one JSON file.

A checkpoint is a folder (written whole under a temporary name, then renamed)::

    checkpoint/
      model.safetensors       parameters (tied tensors stored once per key, each its own copy)
      optimizer.safetensors   the optimizer's per-parameter tensors (Adam moments, step counters)
      rng.safetensors         torch's CPU (and CUDA) random-number-generator states
      averaged.safetensors    (optional) a weight average's state, e.g. an EMA (tessera.train.ema)
      state.json              {"format": ..., "loop": LoopState, "extra": ..., "optimizer": its
                               param groups and non-tensor per-parameter values}

Nothing here calls :mod:`pickle`: safetensors holds raw tensor bytes behind a JSON header, and
everything else is JSON.  A pickle found where a checkpoint is expected (the old ``checkpoint.pt``)
is refused with a one-line error that names :func:`convert_legacy` (``tessera checkpoint convert``),
which reads it with torch's weights-only unpickler (tensors and plain containers only) and writes
this format.

A kill between the two renames of a replacement leaves the previous checkpoint under
``.NAME.old-*``; :func:`resolve_checkpoint` finds it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from tessera.config import atomic_dir
from tessera.errors import InputError

FORMAT = "tessera-checkpoint/1"
_SEP = "\x1f"  # joins parameter name and state key in optimizer.safetensors keys (never in a name)


def _unalias(tensors: dict) -> dict:
    """Contiguous CPU tensors, each with its own storage (safetensors refuses shared memory)."""
    out, seen = {}, set()
    for k, v in tensors.items():
        v = v.detach().cpu().contiguous()
        ptr = (v.untyped_storage().data_ptr(), v.storage_offset()) if v.numel() else None
        if ptr is not None and (ptr in seen or v.untyped_storage().nbytes() != v.numel() * v.element_size()):
            v = v.clone()
        if ptr is not None:
            seen.add(ptr)
        out[k] = v
    return out


def _flatten_optimizer(osd: dict) -> tuple[dict, dict]:
    """An optimizer state dict -> (tensors, JSON-able description)."""
    tensors, state_meta = {}, []
    for pid, entries in osd.get("state", {}).items():
        scalars = {}
        for k, v in entries.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{pid}{_SEP}{k}"] = v
            else:
                scalars[k] = v
        state_meta.append({"id": pid, "scalars": scalars})
    groups = []
    for i, g in enumerate(osd.get("param_groups", [])):
        plain, tuples = {}, []
        for k, v in g.items():
            if isinstance(v, torch.Tensor):
                tensors[f"group{_SEP}{i}{_SEP}{k}"] = v
                continue
            if isinstance(v, tuple):
                tuples.append(k)
            plain[k] = list(v) if isinstance(v, tuple) else v
        groups.append({"values": plain, "tuples": tuples})
    return tensors, {"state": state_meta, "param_groups": groups}


def _unflatten_optimizer(tensors: dict, meta: dict) -> dict:
    state = {}
    for entry in meta["state"]:
        pid = entry["id"]
        vals = dict(entry["scalars"])
        prefix = f"{pid}{_SEP}"
        for k, v in tensors.items():
            if k.startswith(prefix) and _SEP not in k[len(prefix):]:
                vals[k[len(prefix):]] = v
        state[pid] = vals
    groups = []
    for i, g in enumerate(meta["param_groups"]):
        vals = {k: (tuple(v) if k in g["tuples"] else v) for k, v in g["values"].items()}
        prefix = f"group{_SEP}{i}{_SEP}"
        vals.update({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
        groups.append(vals)
    return {"state": state, "param_groups": groups}


def rng_states() -> dict:
    """This process's torch RNG states: ``{"cpu": ..., "cuda0": ...}``."""
    states = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return states


def gathered_rng_states() -> bool | dict:
    """The ``rng`` argument of :func:`write_checkpoint` for the calling process: under torch.distributed
    every rank's states (``{"cpu@0": ..., "cpu@1": ...}``; every rank must call it), else ``True``."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return True
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, rng_states())
    return {f"{k}@{r}": v for r, states in enumerate(gathered) for k, v in states.items()}


def write_checkpoint(path: str | Path, model: dict, optimizer: dict | None = None, state: dict | None = None,
                     extra: dict | None = None, rng: bool | dict = True, averaged: dict | None = None) -> Path:
    """Write a checkpoint folder at ``path`` (replacing one that is there, atomically).

    ``model`` maps names to tensors; ``optimizer`` is an optimizer state dict (plain or from
    ``torch.distributed.checkpoint.state_dict``); ``state`` and ``extra`` must be JSON-able.
    ``rng``: ``True`` saves this process's RNG states, a dict saves the given ones (every rank's:
    ``{"cpu@0": ..., "cpu@1": ...}``), ``False`` none.  ``averaged``: a weight average's state dict
    (names to tensors), written as ``averaged.safetensors``.
    """
    from safetensors.torch import save_file

    path = Path(path)
    for stale in path.parent.glob(f".{path.name}.tmp-*"):  # a write a kill interrupted: not a checkpoint
        shutil.rmtree(stale, ignore_errors=True)
    meta = {"format": FORMAT, "loop": state or {}, "extra": extra or {}, "optimizer": None, "files": []}
    with atomic_dir(path) as tmp:
        save_file(_unalias(model), str(tmp / "model.safetensors"))
        if optimizer is not None:
            tensors, meta["optimizer"] = _flatten_optimizer(optimizer)
            save_file(_unalias(tensors), str(tmp / "optimizer.safetensors"))
        if rng:
            save_file(rng if isinstance(rng, dict) else rng_states(), str(tmp / "rng.safetensors"))
        if averaged is not None:
            save_file(_unalias(averaged), str(tmp / "averaged.safetensors"))
        meta["files"] = sorted(p.name for p in tmp.iterdir())
        try:
            text = json.dumps(meta)
        except (TypeError, ValueError) as e:
            raise InputError(f"cannot write checkpoint {path}: a value is not JSON ({e}); keep optimizer options and "
                             "extra fields to numbers, strings, lists and dicts") from None
        (tmp / "state.json").write_text(text, encoding="utf-8")
    for stale in [*path.parent.glob(f".{path.name}.tmp-*"), *path.parent.glob(f".{path.name}.old-*")]:
        shutil.rmtree(stale, ignore_errors=True)  # left by a run killed mid-write or mid-swap
    return path


def _legacy_error(path: Path) -> InputError:
    return InputError(f"{path} is an old pickle checkpoint, which tessera no longer loads (a pickle can run code); "
                      f"convert it with `tessera checkpoint convert {path}` (reads tensors only) or rerun with resume=false")


def _complete(folder: Path) -> bool:
    """A folder whose ``state.json`` parses and whose listed files are all there (an old folder a
    kill left half-deleted is not)."""
    try:
        meta = json.loads((folder / "state.json").read_text(encoding="utf-8"))
        return isinstance(meta, dict) and isinstance(meta.get("loop"), dict) and \
            all((folder / f).is_file() for f in meta.get("files", ["model.safetensors"]))
    except (OSError, ValueError):
        return False


def resolve_checkpoint(path: str | Path) -> Path | None:
    """The checkpoint folder to resume from: ``path``, else the newest complete ``.NAME.old-*`` a
    kill left between the renames of a replacement, else ``None``.  A pickle at ``path`` or at
    the old ``NAME.pt`` beside it raises the conversion error."""
    path = Path(path)
    legacy = path.with_name(path.name + ".pt")
    if path.is_file():
        raise _legacy_error(path)
    if path.is_dir():
        return path
    olds = [p for p in path.parent.glob(f".{path.name}.old-*") if _complete(p)]
    if olds:
        return max(olds, key=lambda p: json.loads((p / "state.json").read_text(encoding="utf-8"))["loop"].get("step", 0))
    if legacy.is_file():
        raise _legacy_error(legacy)
    return None


def read_checkpoint(path: str | Path, restore_rng: bool = False, rank: int = 0, averaged: bool = False) -> dict:
    """Read a checkpoint folder: ``{"model", "optimizer", "state", "extra", "averaged"}`` (tensors on CPU;
    ``averaged``, read only when asked for, is ``None`` where the run kept no weight average).

    Anything that is not this format (a pickle, a truncated or foreign file) raises a one-line
    :class:`InputError`; no byte of it is unpickled.  ``restore_rng`` sets torch's RNG states
    (``rank``'s own where every rank's were saved).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if path.is_file():
        raise _legacy_error(path)
    meta_path = path / "state.json"
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{path} is not a tessera checkpoint (no state.json); point at the run's checkpoint folder") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{meta_path} is damaged ({e}); delete the checkpoint folder to start afresh") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise InputError(f"{meta_path}: not a {FORMAT} checkpoint; delete the checkpoint folder to start afresh")

    def load(name: str) -> dict | None:
        f = path / name
        if not f.is_file():
            return None
        try:
            return load_file(str(f))
        except (SafetensorError, OSError, ValueError) as e:
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise InputError(f"{f} is not a readable safetensors file ({msg}); delete the checkpoint folder to start afresh") from None

    missing = [f for f in meta.get("files", []) if not (path / f).is_file()]
    if missing:
        raise InputError(f"{path} is incomplete ({', '.join(missing)} missing); delete the checkpoint folder to start afresh")
    model = load("model.safetensors")
    if model is None:
        raise InputError(f"{path} has no model.safetensors; delete the checkpoint folder to start afresh")
    opt = None
    if meta.get("optimizer") is not None:
        opt = _unflatten_optimizer(load("optimizer.safetensors") or {}, meta["optimizer"])
    if restore_rng:
        rng = load("rng.safetensors") or {}
        if any("@" in k for k in rng):  # saved per rank: this rank's, or none (more ranks than were saved)
            rng = {k.split("@")[0]: v for k, v in rng.items() if k.endswith(f"@{rank}")}
        if "cpu" in rng:
            torch.set_rng_state(rng["cpu"])
        cuda = [rng[k] for k in sorted((k for k in rng if k.startswith("cuda")), key=lambda k: int(k[4:]))]
        if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
    return {"model": model, "optimizer": opt, "state": meta.get("loop", {}), "extra": meta.get("extra", {}),
            "averaged": load("averaged.safetensors") if averaged else None}


def save_tensors(path: str | Path, tensors: dict) -> Path:
    """A plain ``name -> tensor`` dict (a cached module's state dict) to one safetensors file, atomically."""
    from safetensors.torch import save_file

    from tessera.config import atomic_file

    path = Path(path)
    with atomic_file(path) as tmp:
        save_file(_unalias(tensors), str(tmp))
    return path


def load_tensors(path: str | Path) -> dict:
    """Read what :func:`save_tensors` wrote; a foreign or damaged file raises a one-line :class:`InputError`."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise InputError(f"{path} is not a readable safetensors file ({msg}); delete it to rebuild the cache") from None


def convert_legacy(src: str | Path, dst: str | Path | None = None) -> Path:
    """Convert an old ``checkpoint.pt`` (``{"model"|"trainable", "optimizer", "state", "extra"}``)
    to a checkpoint folder, reading it with ``torch.load(weights_only=True)``: torch's restricted
    unpickler, which builds tensors and plain containers and refuses anything else."""
    src = Path(src)
    if not src.is_file():
        raise InputError(f"{src}: no such file; give the old checkpoint.pt to convert")
    dst = Path(dst) if dst is not None else src.with_suffix("")
    try:
        ck = torch.load(src, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any refusal is the user's file, reported in one line
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise InputError(f"{src} cannot be read as tensors only ({msg}); it is not a tessera checkpoint, or it holds code") from None
    if not isinstance(ck, dict) or not ({"model", "trainable"} & set(ck)):
        raise InputError(f"{src} is not a tessera checkpoint (no model or trainable tensors)")
    return write_checkpoint(dst, ck.get("model", ck.get("trainable")), ck.get("optimizer"), ck.get("state", {}),
                            ck.get("extra", {}), rng=False)
