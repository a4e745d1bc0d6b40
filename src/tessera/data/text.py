"""Plain-text corpora: WikiText articles, user corpora (files and folders), Python's docs."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from tessera.data.jsonl import read_jsonl_numbered, read_text
from tessera.data.types import Document
from tessera.errors import DataFormatError, EmptyCorpusError, InputError

log = logging.getLogger(__name__)

PathLike = str | os.PathLike

TEXT_SUFFIXES = (".txt", ".md", ".rst")
CORPUS_SUFFIXES = (*TEXT_SUFFIXES, ".jsonl")

_TOP_HEADING = re.compile(r"^ ?= (?!=)(.*?\S) = ?$")
_SUB_HEADING = re.compile(r"^ ?(?:= ){2,}(.*?\S)(?: =){2,} ?$")


def read_wikitext(path: PathLike) -> list[Document]:
    """WikiText articles: one :class:`Document` per top-level `` = Title = `` heading.

    Works on the tokenized files (``test.txt``, ``valid.txt``) and the raw ones
    (``wiki.test.raw``, CRLF).  ``text`` is the article's non-empty lines, stripped and
    joined with newlines; sub-headings (`` = = Career = = ``) stay as their own line
    without the ``=`` marks.  Ids are ``"0"``, ``"1"``, ... in file order.
    """
    lines = read_text(path, "WikiText file").split("\n")
    arts: list[tuple[str, list[str]]] = []
    for line in lines:
        m = _TOP_HEADING.match(line)
        if m:
            arts.append((m.group(1), []))
            continue
        s = line.strip()
        if not s or not arts:
            continue
        sub = _SUB_HEADING.match(line)
        arts[-1][1].append(sub.group(1) if sub else s)
    if not arts:
        raise DataFormatError(path, None, "no ' = Title = ' headings found", hint="pass a WikiText file")
    return [Document(str(i), title, "\n".join(body)) for i, (title, body) in enumerate(arts)]


def _md_title(text: str) -> str:
    first = next((ln.strip() for ln in text.split("\n") if ln.strip()), "")
    return first.lstrip("#").strip() if first.startswith("# ") else ""


def _text_doc(path: Path, doc_id: str) -> Document:
    text = read_text(path)
    return Document(doc_id, _md_title(text) if path.suffix == ".md" else "", text)


def _jsonl_docs(path: Path, prefix: str, skip_bad: bool) -> tuple[list[Document], int]:
    rows, n_bad = read_jsonl_numbered(path, skip_bad)
    docs = []
    for lineno, row in rows:
        text = row.get("text", row.get("contents"))
        if not isinstance(text, str):
            if skip_bad:
                n_bad += 1
                continue
            raise DataFormatError(path, lineno, 'a corpus row needs a string "text" (or "contents")')
        rid = next((row[k] for k in ("id", "_id", "docid") if row.get(k) not in (None, "")), None)
        did = str(rid) if rid is not None else f"{prefix}{lineno}"
        docs.append(Document(did, str(row.get("title") or ""), text))
    return docs, n_bad


def _folder_files(root: Path) -> list[Path]:
    files = []
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if any(part.startswith(".") for part in rel.parts) or not p.is_file():
            continue
        if p.suffix.lower() in CORPUS_SUFFIXES:
            files.append(p)
    return files


def load_corpus_counted(path: PathLike, skip_bad: bool = False) -> tuple[list[Document], int]:
    """``(documents, n_skipped_rows)``; see :func:`load_corpus`."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"corpus {p} not found; check the path")
    docs: list[Document] = []
    n_bad = 0
    if p.is_dir() and (p / "corpus.jsonl").is_file():
        docs, n_bad = _jsonl_docs(p / "corpus.jsonl", "corpus.jsonl:", skip_bad)
    elif p.is_dir():
        for f in _folder_files(p):
            rel = f.relative_to(p).as_posix()
            if f.suffix.lower() == ".jsonl":
                more, n = _jsonl_docs(f, f"{rel}:", skip_bad)
                docs += more
                n_bad += n
            else:
                docs.append(_text_doc(f, rel))
    elif p.suffix.lower() == ".jsonl":
        docs, n_bad = _jsonl_docs(p, "", skip_bad)
    elif p.suffix.lower() in TEXT_SUFFIXES:
        docs = [_text_doc(p, p.name)]
    else:
        raise InputError(f"unsupported corpus file {p}; pass a .jsonl, .txt, .md or .rst file or a folder of them")
    docs = [d for d in docs if d.text.strip()]
    if not docs:
        raise EmptyCorpusError(f"{p} has no documents; add non-empty .txt, .md, .rst or .jsonl (with a \"text\" field) files")
    seen: dict[str, int] = {}
    for d in docs:
        seen[d.id] = seen.get(d.id, 0) + 1
    dups = [k for k, v in seen.items() if v > 1]
    if dups:
        raise InputError(f"{p}: duplicate document id {dups[0]!r} ({len(dups)} ids repeat); give every document a unique id")
    if n_bad:
        log.warning("skipped %d malformed rows in %s", n_bad, p)
    return docs, n_bad


def load_corpus(path: PathLike, skip_bad: bool = False) -> list[Document]:
    """A user corpus as documents.

    - ``.jsonl`` file: rows with ``text`` (or pyserini's ``contents``), optional
      ``id``/``_id``/``docid`` (default: the line number) and ``title``;
    - ``.txt``/``.md``/``.rst`` file: one document (id = file name; a ``.md`` file's
      leading ``# Heading`` is its title);
    - BEIR folder (has ``corpus.jsonl``): that file;
    - any other folder: every ``.txt``/``.md``/``.rst``/``.jsonl`` below it (hidden
      files skipped), id = path relative to the folder (``rel.jsonl:LINE`` for rows
      without an id).

    Whitespace-only documents are dropped.  Missing path or non-UTF-8 file ->
    :class:`InputError`; no documents -> :class:`EmptyCorpusError`; malformed JSONL
    rows -> :class:`DataFormatError` unless ``skip_bad``.
    """
    return load_corpus_counted(path, skip_bad)[0]


_RST_UNDERLINE = re.compile(r"^([*=\-~^\"'#+])\1{2,}\s*$")


def _topic_title(key: str, text: str) -> str:
    lines = text.split("\n", 2)
    if len(lines) >= 2 and lines[0].strip() and _RST_UNDERLINE.match(lines[1]):
        return lines[0].strip()
    return key.replace("-", " ").replace("_", " ").capitalize()


def python_docs_corpus() -> list[Document]:
    """Python's own documentation topics (``pydoc_data.topics``, shipped with CPython).

    One document per topic: id = topic key (``"assert"``, ``"atom-identifiers"``, ...),
    title = the topic's own heading (``The "assert" statement``) or one made from the
    key, text = the topic text as shipped (about 79 topics, 465k characters on 3.12+).
    """
    try:
        from pydoc_data.topics import topics
    except ImportError:  # pragma: no cover - stripped-down Python builds
        raise InputError("this Python has no pydoc_data; install a full CPython or pass your own corpus") from None
    return [Document(k, _topic_title(k, v), v) for k, v in sorted(topics.items()) if v.strip()]
