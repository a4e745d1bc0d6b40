"""Console, progress bars and the global ``--quiet`` switch."""

from __future__ import annotations

import contextlib
import os
import sys

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True, highlight=False)
out = Console(highlight=False, soft_wrap=True)

_quiet = bool(os.environ.get("TESSERA_QUIET"))
_other_rank = int(os.environ.get("RANK", "0")) != 0  # under torchrun only rank 0 reports progress


def set_quiet(value: bool) -> None:
    global _quiet
    _quiet = bool(value)


def is_quiet() -> bool:
    return _quiet or _other_rank


def progress(transient: bool = True) -> Progress:
    """A rich progress bar on stderr; disabled under ``--quiet`` or when stderr is not a terminal."""
    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=transient,
        disable=is_quiet() or not sys.stderr.isatty(),
    )


@contextlib.contextmanager
def status(message: str):
    """A spinner for work without a known length (e.g. loading a model)."""
    if is_quiet() or not sys.stderr.isatty():
        yield
        return
    with console.status(message):
        yield


def info(message: str) -> None:
    if not is_quiet():
        console.print(message)


def quiet_libraries() -> None:
    """Command-line defaults (a user's own settings win): no transformers/HF Hub chatter or progress bars,
    no tokenizers fork warning.  Call before transformers is imported."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def run_app(typer_app) -> None:
    """Run a typer app with tessera's error contract: a TesseraError is one line on stderr, exit 2."""
    from tessera.errors import TesseraError

    quiet_libraries()
    try:
        typer_app()
    except TesseraError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        print("error: interrupted; run the command again (unfinished caches are discarded and rebuilt)", file=sys.stderr)
        sys.exit(130)
