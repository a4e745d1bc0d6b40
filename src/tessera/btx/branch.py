"""BTX branch-and-train (Sec. 3.1): copies of a seed LLM, each trained on one domain, with no communication.

Every expert is trained by its own operating-system process (``python -m
tessera.btx.branch --spec SPEC.json``): it loads the seed from disk, reads its own domain,
trains with the HF Trainer and writes its own folder.  The processes share nothing (no
parameters, no gradients, no files), so they run in parallel when cores allow
(``max_parallel``) and on different machines on a cluster.  On GPUs, launch each expert
with ``launcher="torchrun"`` (``torchrun --standalone --nproc_per_node=G -m
tessera.btx.branch --spec ...``: data parallel *within* one expert, none between experts),
or copy the command that :func:`expert_command` prints to one node per expert.

A finished expert folder holds the Hugging Face checkpoint plus ``expert.json`` (domain,
steps, tokens, FLOPs, seconds, process id, loss curve); a rerun skips finished experts
(resume), and a half-trained expert is never mistaken for a finished one (the folder is
written under a temporary name and renamed).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from tessera.btx.data import Domain
from tessera.btx.train import TrainSettings
from tessera.config import atomic_dir, atomic_write_text
from tessera.errors import InputError, TesseraError


def expert_dir(out_root: str | Path, domain: Domain) -> Path:
    return Path(out_root) / f"expert-{domain.name}"


def is_done(folder: Path) -> bool:
    return (folder / "expert.json").is_file() and (folder / "config.json").is_file()


def train_expert(seed_model: str, domain: Domain, out: str | Path, settings: TrainSettings, seq_len: int = 256,
                 max_train_blocks: int | None = None, threads: int = 0) -> Path:
    """Branch ``seed_model`` and train the copy on ``domain`` (this process only); returns the expert folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tessera import hub
    from tessera.btx.data import domain_blocks
    from tessera.btx.train import train_flops_per_token, train_model

    if threads:
        torch.set_num_threads(threads)
    out = Path(out)
    path = hub.resolve_lm(seed_model)
    device = hub.default_device()
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device)
    blocks, _ = domain_blocks(domain, tok, seq_len, max_train_blocks=max_train_blocks, seed=settings.seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.trainer-", dir=out.parent, ignore_cleanup_errors=True) as scratch:
        t0 = time.perf_counter()
        model, history = train_model(model, blocks, Path(scratch) / "trainer", settings)
        seconds = time.perf_counter() - t0
    if int(os.environ.get("RANK", "0")) != 0:  # torchrun: rank 0 writes the expert
        return out
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        tokens = settings.steps * settings.batch_size * settings.grad_accum * seq_len
        info = {"domain": domain.name, "source": domain.source, "seed_model": str(path), "steps": settings.steps,
                "tokens": tokens, "train_flops": train_flops_per_token(model.config, seq_len) * tokens, "seconds": seconds,
                "pid": os.getpid(), "train_blocks": int(blocks.shape[0]), "settings": asdict(settings),
                "loss": [r["loss"] for r in history if "loss" in r]}
        (tmp / "expert.json").write_text(json.dumps(info, indent=2))
    return out


def _death_signal():
    """A callable that asks the kernel (Linux ``prctl(PR_SET_PDEATHSIG, SIGKILL)``) to kill the
    calling process when the process that started it dies, or ``None`` elsewhere.  Resolved in
    the parent: after a fork only the bare call runs (no library loading in the child)."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes
    import signal

    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return lambda: prctl(1, signal.SIGKILL)


def _die_with_parent(parent: int | None = None) -> None:
    """Die with the parent, so a ``kill -9`` of the recipe leaves no expert training on behind it;
    if the parent is already gone (it died before the call), exit now."""
    set_signal = _death_signal()
    if set_signal is not None:
        set_signal()
    if parent is not None and os.getppid() != parent:
        os._exit(1)


def expert_command(spec_file: Path, launcher: str = "python", nproc: int = 1) -> list[str]:
    if launcher == "python":
        return [sys.executable, "-m", "tessera.btx.branch", "--spec", str(spec_file)]
    if launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                "-m", "tessera.btx.branch", "--spec", str(spec_file)]
    raise InputError(f"launcher={launcher!r}; use python or torchrun")


def branch_train(seed_model: str, domains: list[Domain], out_root: str | Path, settings: TrainSettings, *,
                 seq_len: int = 256, max_train_blocks: int | None = None, max_parallel: int = 0, threads_per_expert: int = 1,
                 launcher: str = "python", nproc: int = 1, env: dict | None = None, on_done=None) -> list[Path]:
    """Train one expert per domain, each in its own process; up to ``max_parallel`` at once
    (0: as many as ``cpu_count // threads_per_expert``).  Finished experts are skipped."""
    from tessera import ui

    out_root = Path(out_root)
    out_root.mkdir(parents=True, exist_ok=True)
    if max_parallel <= 0:
        max_parallel = max(1, (os.cpu_count() or 1) // max(1, threads_per_expert))
    for stale in [*out_root.glob(".expert-*.trainer-*"), *out_root.glob(".expert-*.tmp-*")]:
        shutil.rmtree(stale, ignore_errors=True)  # scratch of experts a killed run left unfinished
    jobs = []
    for d in domains:
        folder = expert_dir(out_root, d)
        if is_done(folder):
            ui.info(f"expert {d.name}: done already ({folder})")
            continue
        spec = {"seed_model": str(seed_model), "domain": asdict(d), "out": str(folder), "settings": asdict(settings),
                "seq_len": seq_len, "max_train_blocks": max_train_blocks, "threads": threads_per_expert}
        spec_file = out_root / f"spec-{d.name}.json"
        atomic_write_text(spec_file, json.dumps(spec, indent=2))
        jobs.append((d, spec_file))
    running: list = []
    failures = []
    set_signal = _death_signal()
    proc_env = {**os.environ, "OMP_NUM_THREADS": str(threads_per_expert), "TOKENIZERS_PARALLELISM": "false", **(env or {})}

    def reap(block: bool):
        for item in list(running):
            d, p, log = item
            if block or p.poll() is not None:
                p.wait()
                log.close()
                running.remove(item)
                if p.returncode != 0:
                    tail = Path(log.name).read_text(errors="replace").strip().splitlines()[-1:] or ["no output"]
                    failures.append(f"expert {d.name} failed (exit {p.returncode}): {tail[0][:200]}; see {log.name}")
                elif on_done:
                    on_done(d)
                if not block:
                    return True
        return False

    for d, spec_file in jobs:
        while len(running) >= max_parallel:
            if not reap(False):
                time.sleep(0.2)
        log = open(out_root / f"log-{d.name}.txt", "w")
        ui.info(f"expert {d.name}: training in a new process")
        p = subprocess.Popen(expert_command(spec_file, launcher, nproc), stdout=log, stderr=subprocess.STDOUT, env=proc_env,
                             preexec_fn=set_signal)
        running.append((d, p, log))
    while running:
        reap(True)
    if failures:
        raise TesseraError(failures[0])
    return [expert_dir(out_root, d) for d in domains]


def _main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="Train one BTX expert (one process, no shared state).")
    ap.add_argument("--spec", required=True, help="JSON written by branch_train")
    a = ap.parse_args(argv)
    if os.environ.get("TORCHELASTIC_RUN_ID") or os.environ.get("LOCAL_RANK"):
        _die_with_parent()  # a torchrun worker: its agent starts it in a new session, so die with the agent too
    spec = json.loads(Path(a.spec).read_text())
    rank = int(os.environ.get("RANK", "0"))
    try:
        train_expert(spec["seed_model"], Domain(**spec["domain"]), spec["out"], TrainSettings(**spec["settings"]),
                     seq_len=spec["seq_len"], max_train_blocks=spec["max_train_blocks"], threads=spec.get("threads", 0))
    except TesseraError as e:
        if rank == 0:
            print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)


if __name__ == "__main__":
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    _main()
