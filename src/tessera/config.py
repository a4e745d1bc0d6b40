"""Dataclass configs: a YAML file plus ``key=value`` overrides (OmegaConf), and dump dirs.

Every recipe has a config dataclass with ``seed`` and ``dump_dir``;
``tessera run RECIPE [config.yaml] key=value ...`` builds it with
:func:`load_config`, and the recipe writes ``config.yaml``, ``metrics.jsonl`` and
``results.json`` into its dump dir.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from tessera.errors import InputError

T = TypeVar("T")


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> T:
    """Defaults of ``cls`` <- YAML file <- dot-list overrides, type-checked, as a ``cls`` instance."""
    schema = OmegaConf.structured(cls)
    layers = [schema]
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise InputError(f"config file {p} not found; pass an existing YAML file or only key=value overrides")
        try:
            layers.append(OmegaConf.load(p))
        except Exception as e:
            raise InputError(f"{p}: not valid YAML ({str(e).splitlines()[0]}); fix the file") from None
    for item in overrides:
        if "=" not in item:
            raise InputError(f"override '{item}' is not key=value; write e.g. seed=1")
    try:
        layers.append(OmegaConf.from_dotlist(list(overrides)))
        merged = OmegaConf.merge(*layers)
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        msg = str(e).splitlines()[0]
        fields = ", ".join(f.name for f in dataclasses.fields(cls))
        raise InputError(f"bad config value ({msg}); known keys: {fields}") from None


def to_yaml(cfg: Any) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """The one way tessera writes a file: yields a temporary path in the same folder to write to
    (with ``torch.save``, ``np.save``, ``save_file``, ``open``), then renames it onto ``path``.

    Readers see the old file or the new one, never half of one.  The temporary name ends in
    ``.tmp``: a writer that infers the format from the name is told it (``savefig(format=...)``,
    ``np.save`` to an open file).  The file gets mode 0644 (``mkstemp`` makes 0600; results are
    meant to be shared).  On any exception the temporary
    file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) through :func:`atomic_file`."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_savefig(fig, path: str | Path, **savefig_kw) -> Path:
    """``fig.savefig(path, **savefig_kw)`` through :func:`atomic_file`; closes ``fig``."""
    import matplotlib.pyplot as plt

    try:
        with atomic_file(path) as tmp:
            savefig_kw.setdefault("format", Path(path).suffix.lstrip(".") or None)
            fig.savefig(tmp, **savefig_kw)
    finally:
        plt.close(fig)
    return Path(path)


@contextlib.contextmanager
def atomic_dir(out: str | Path, *, keep_existing: bool = False) -> Iterator[Path]:
    """Build a folder under a temporary sibling name (``.NAME.tmp-*``), then rename it to ``out``.

    Yields the temporary folder to write into.  When the block ends normally the folder gets
    mode 0755 (``mkdtemp`` makes 0700) and takes the place of ``out``: an old ``out`` is first
    renamed aside and removed after the swap, so readers see the old folder or the new one,
    never half of one.  With ``keep_existing`` an ``out`` that exists by then (another process
    won the race to build the same cache entry) is kept and the new folder dropped.  On any
    exception (``KeyboardInterrupt`` included) the temporary folder is removed and the
    exception propagates.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        tmp.chmod(0o755)
        if not out.exists():
            os.replace(tmp, out)
        elif keep_existing:
            shutil.rmtree(tmp)
        else:
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            old.rmdir()
            os.replace(out, old)
            os.replace(tmp, out)
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.unlink(missing_ok=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def is_main_process() -> bool:
    """Rank 0 under ``torchrun`` (``RANK``), or a plain single process: the one that writes outputs."""
    return int(os.environ.get("RANK", "0")) == 0


def prune_metric_rows(path: str | Path, keep) -> None:
    """Rewrite a ``metrics.jsonl`` (atomically) with the rows ``keep(row)`` accepts; lines that do
    not parse as a JSON object (torn by a kill mid-write) are dropped."""
    path = Path(path)
    if not path.is_file():
        return
    rows = []
    for ln in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(ln)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and keep(row):
            rows.append(ln)
    atomic_write_text(path, "".join(r + "\n" for r in rows))


class DumpDir:
    """A run's output folder: ``config.yaml``, ``metrics.jsonl`` (appended), ``results.json``.

    ``fresh`` (the default) starts ``metrics.jsonl`` empty, so a rerun (after a kill, or of a
    finished run) never duplicates rows; recipes that resume mid-run pass ``fresh=False`` and
    keep the rows their checkpoint covers (:meth:`prune_metrics`)."""

    def __init__(self, path: str | Path, cfg: Any = None, fresh: bool = True):
        self.path = Path(path)
        self.main = is_main_process()  # under torchrun only rank 0 writes; the other ranks' calls do nothing
        self.path.mkdir(parents=True, exist_ok=True)
        if not self.main:
            return
        if cfg is not None:
            atomic_write_text(self.path / "config.yaml", to_yaml(cfg))
        if fresh:
            (self.path / "metrics.jsonl").unlink(missing_ok=True)

    def prune_metrics(self, keep) -> None:
        """Keep only the ``metrics.jsonl`` rows ``keep(row)`` accepts (and no torn line)."""
        if self.main:
            prune_metric_rows(self.path / "metrics.jsonl", keep)

    def log(self, **metrics: Any) -> None:
        if not self.main:
            return
        with open(self.path / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(metrics) + "\n")

    def write_results(self, results: dict) -> Path:
        out = self.path / "results.json"
        if not self.main:
            return out
        atomic_write_text(out, json.dumps(results, indent=2))
        return out
