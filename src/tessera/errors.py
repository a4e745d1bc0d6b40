"""One-line, actionable errors.

Every error a user can cause (bad input, missing model, too-long text) is a
:class:`TesseraError`.  The CLI prints ``error: <message>`` on one line and exits
with code 2; library users catch the exception.
"""

from __future__ import annotations


class TesseraError(Exception):
    """Base class: ``str(err)`` is a single line that says what to do."""

    exit_code = 2

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


class InputError(TesseraError):
    """A file, row or argument the user gave is missing or malformed."""


class DataFormatError(InputError):
    """A malformed row in a data file; the message names file and line."""

    def __init__(self, path, line: int | None, what: str, hint: str = "fix the row or pass --skip-bad to skip malformed rows"):
        where = f"{path}:{line}" if line is not None else str(path)
        super().__init__(f"{where}: {what}; {hint}")
        self.path, self.line = str(path), line


class EmptyCorpusError(InputError):
    """A corpus with no usable documents."""


class ModelNotFoundError(TesseraError):
    """A model spec that cannot be resolved offline."""


class ContextTooLongError(InputError):
    """Text that does not fit the model's context window."""


class Cancelled(TesseraError):
    """Work stopped early because its caller asked it to (a ``should_stop`` hook returned true)."""
