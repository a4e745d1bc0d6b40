"""Question-answering sets: HotpotQA (official JSON) and MMLU (hendrycks CSV)."""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from tessera.data.ir import _csv_rows
from tessera.data.jsonl import _SURROGATE_ESCAPE, _has_lone_surrogate, read_text
from tessera.errors import DataFormatError, InputError

PathLike = str | os.PathLike


@dataclass
class HotpotExample:
    """One HotpotQA question with its 10 (gold + distractor) paragraphs.

    ``context`` is ``[(title, [sentence, ...]), ...]``; ``supporting_facts`` is
    ``[(title, sentence_index), ...]`` into ``context`` (the gold evidence).
    Sentences keep the source's leading spaces, so ``"".join(sentences)`` is the paragraph.
    """

    id: str
    question: str
    answer: str
    type: str = ""
    level: str = ""
    context: list[tuple[str, list[str]]] = field(default_factory=list)
    supporting_facts: list[tuple[str, int]] = field(default_factory=list)

    def supporting_sentences(self) -> list[tuple[str, int, str]]:
        """``[(title, index, sentence), ...]`` for the supporting facts that exist in ``context``."""
        paras = dict(self.context)
        return [(t, i, paras[t][i]) for t, i in self.supporting_facts if t in paras and 0 <= i < len(paras[t])]


def read_hotpotqa(path: PathLike) -> list[HotpotExample]:
    """The official HotpotQA JSON list (``_id``, ``question``, ``answer``, ``type``,
    ``level``, ``context``, ``supporting_facts``); test files without answers get ``""``."""
    p = Path(path)
    text = read_text(p, "HotpotQA file")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataFormatError(p, e.lineno, f"malformed JSON ({e.msg})", hint="pass the official HotpotQA JSON file") from None
    except ValueError as e:  # e.g. a number too long to convert
        raise DataFormatError(p, None, f"malformed JSON ({e})", hint="pass the official HotpotQA JSON file") from None
    except RecursionError:
        raise DataFormatError(p, None, "malformed JSON (nested too deeply)", hint="pass the official HotpotQA JSON file") from None
    if not isinstance(data, list):
        raise DataFormatError(p, 1, "expected a JSON list of examples", hint="pass the official HotpotQA JSON file")
    out = []
    suspicious = _SURROGATE_ESCAPE.search(text) is not None  # a lone "\\ud800" escape: find its example
    for i, r in enumerate(data):
        if suspicious and _has_lone_surrogate(r):
            raise DataFormatError(p, None, f"example {i} has a \\u escape that encodes a lone surrogate (not valid Unicode)",
                                  hint="pass the official HotpotQA JSON file")
        try:
            context = [(str(t), [str(s) for s in sents]) for t, sents in r["context"]]
            facts = [(str(t), int(k)) for t, k in r.get("supporting_facts", [])]
            out.append(
                HotpotExample(
                    id=str(r["_id"]),
                    question=str(r["question"]),
                    answer=str(r.get("answer", "")),
                    type=str(r.get("type", "")),
                    level=str(r.get("level", "")),
                    context=context,
                    supporting_facts=facts,
                )
            )
        except (KeyError, TypeError, ValueError, OverflowError) as e:  # OverflowError: int(Infinity)
            raise DataFormatError(p, None, f"example {i} is malformed ({type(e).__name__}: {e})", hint="pass the official HotpotQA JSON file") from None
    return out


@dataclass(frozen=True)
class MMLUQuestion:
    """One MMLU multiple-choice question; ``answer`` is ``"A"``..``"D"``."""

    id: str
    subject: str
    question: str
    choices: tuple[str, str, str, str]
    answer: str

    @property
    def answer_index(self) -> int:
        return "ABCD".index(self.answer)


def read_mmlu(folder: PathLike, split: str = "val", subjects: Iterable[str] | None = None, skip_bad: bool = False) -> list[MMLUQuestion]:
    """MMLU from ``{folder}/{split}/{subject}_{split}.csv`` (no header:
    ``question,A,B,C,D,answer``), subjects in file-name order, ids ``{subject}/{split}/{row}``.

    Shared data: dev 285 rows (5 per subject), val 1,531, 57 subjects.
    """
    root = Path(folder) / split
    if not root.is_dir():
        raise InputError(f"MMLU folder {root} not found; pass the folder that holds {split}/")
    files = sorted(root.glob(f"*_{split}.csv"))
    if subjects is not None:
        wanted = set(subjects)
        files = [f for f in files if f.name[: -len(f"_{split}.csv")] in wanted]
        missing = wanted - {f.name[: -len(f"_{split}.csv")] for f in files}
        if missing:
            raise InputError(f"unknown MMLU subject(s) {sorted(missing)} in {root}; check the names")
    if not files:
        raise InputError(f"no *_{split}.csv files in {root}; pass the MMLU data folder")
    out = []
    for f in files:
        subject = f.name[: -len(f"_{split}.csv")]
        reader = csv.reader(io.StringIO(read_text(f), newline=""))
        start, row_i = 0, 0
        for row in _csv_rows(reader):
            lineno, start = start + 1, reader.line_num
            if isinstance(row, csv.Error):
                row_i += 1
                if skip_bad:
                    continue
                raise DataFormatError(f, lineno, f"malformed CSV ({row}); check for an unterminated quote")
            if not row:
                continue
            ans, i = row[-1].strip().upper(), row_i
            row_i += 1
            if len(row) != 6 or ans not in ("A", "B", "C", "D"):
                if skip_bad:
                    continue
                raise DataFormatError(f, lineno, "expected 6 columns question,A,B,C,D,answer with answer in A-D")
            out.append(MMLUQuestion(f"{subject}/{split}/{i}", subject, row[0], (row[1], row[2], row[3], row[4]), ans))
    return out
