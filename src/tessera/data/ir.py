"""Readers for IR test collections: BEIR, SciFact (CSV corpus), TREC (Vaswani), Cranfield, BRIGHT.

Every reader returns a :class:`~tessera.data.types.Collection` with graded qrels
(higher = more relevant, pytrec_eval's convention).  Queries without any judgement
in the chosen split are dropped, since they cannot be scored; qrels of dropped
queries are dropped with them.  Judgements that point at documents missing from
the corpus are kept (they count as relevant documents no system can find).

Malformed rows raise :class:`~tessera.errors.DataFormatError` naming ``file:line``;
``skip_bad=True`` skips them and counts them in ``Collection.n_skipped``.
"""

from __future__ import annotations

import ast
import csv
import io
import os
import re
import tokenize
from pathlib import Path

from tessera.data.jsonl import check_file, read_jsonl_numbered, read_text
from tessera.data.types import Collection, Document, Query
from tessera.errors import DataFormatError, InputError

PathLike = str | os.PathLike


class _Bad:
    """Counts skipped rows, or raises, depending on ``skip_bad``."""

    def __init__(self, skip_bad: bool):
        self.skip_bad, self.n = skip_bad, 0

    def __call__(self, path, line, what: str) -> None:
        if not self.skip_bad:
            raise DataFormatError(path, line, what)
        self.n += 1


def _folder(folder: PathLike, what: str) -> Path:
    p = Path(folder)
    if not p.is_dir():
        raise InputError(f"{what} folder {p} not found; check the path")
    return p


def _need(folder: Path, name: str, layout: str) -> Path:
    p = folder / name
    if not p.is_file():
        raise InputError(f"{p} not found; expected {layout}")
    return p


def _grade(s: str) -> int:
    try:
        return int(s)
    except ValueError:
        f = float(s)
        if not f.is_integer():
            raise
        return int(f)


def _finish(docs, queries, qrels, name: str, n_skipped: int) -> Collection:
    kept = [q for q in queries if qrels.get(q.id)]
    qrels = {q.id: qrels[q.id] for q in kept}
    return Collection(docs=docs, queries=kept, qrels=qrels, name=name, n_skipped=n_skipped)


def _add_qrel(qrels: dict, qid: str, did: str, grade: int) -> None:
    qrels.setdefault(qid, {})[did] = grade


def _csv_rows(reader):
    """Rows of a ``csv.reader``; a ``csv.Error`` (an unterminated quote that runs past the
    field size limit) is yielded in place of its row, and reading goes on with the next line."""
    while True:
        try:
            yield next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            yield e


# --------------------------------------------------------------------------- BEIR


def read_beir_qrels(path: PathLike, skip_bad: bool = False, _bad: _Bad | None = None) -> dict[str, dict[str, int]]:
    """BEIR ``qrels/*.tsv``: ``query-id<TAB>corpus-id<TAB>score`` with a header row."""
    bad = _bad or _Bad(skip_bad)
    p = check_file(path, "qrels file")
    qrels: dict[str, dict[str, int]] = {}
    for lineno, line in enumerate(read_text(p).split("\n"), 1):
        if not line.strip():
            continue
        parts = line.split("\t") if "\t" in line else line.split()
        if lineno == 1 and parts and parts[0].strip().lower() in ("query-id", "query_id", "qid"):
            continue
        if len(parts) != 3:
            bad(p, lineno, f"expected 3 tab-separated columns (query-id, corpus-id, score), got {len(parts)}")
            continue
        try:
            grade = _grade(parts[2].strip())
        except ValueError:
            bad(p, lineno, f"score {parts[2].strip()!r} is not an integer")
            continue
        _add_qrel(qrels, parts[0].strip(), parts[1].strip(), grade)
    return qrels


def _beir_docs(path: Path, bad: _Bad) -> list[Document]:
    rows, n = read_jsonl_numbered(path, bad.skip_bad)
    bad.n += n
    docs, seen = [], set()
    for lineno, row in rows:
        did, text = row.get("_id"), row.get("text")
        if did is None or not isinstance(text, str):
            bad(path, lineno, 'a corpus row needs "_id" and a string "text"')
            continue
        did = str(did)
        if did in seen:
            bad(path, lineno, f"duplicate document id {did!r}")
            continue
        seen.add(did)
        docs.append(Document(did, str(row.get("title") or ""), text))
    return docs


def _beir_queries(path: Path, bad: _Bad) -> list[Query]:
    rows, n = read_jsonl_numbered(path, bad.skip_bad)
    bad.n += n
    out = []
    for lineno, row in rows:
        qid, text = row.get("_id"), row.get("text")
        if qid is None or not isinstance(text, str):
            bad(path, lineno, 'a query row needs "_id" and a string "text"')
            continue
        out.append(Query(str(qid), text))
    return out


def read_beir(folder: PathLike, split: str = "test", skip_bad: bool = False) -> Collection:
    """A BEIR folder: ``corpus.jsonl`` (``_id``, ``title``, ``text``), ``queries.jsonl``
    (``_id``, ``text``) and ``qrels/{split}.tsv``.  Only queries judged in ``split`` are kept."""
    root = _folder(folder, "BEIR")
    layout = "a BEIR folder with corpus.jsonl, queries.jsonl and qrels/{split}.tsv"
    bad = _Bad(skip_bad)
    docs = _beir_docs(_need(root, "corpus.jsonl", layout), bad)
    queries = _beir_queries(_need(root, "queries.jsonl", layout), bad)
    qrels = read_beir_qrels(_need(root, f"qrels/{split}.tsv", layout.replace("{split}", split)), _bad=bad)
    return _finish(docs, queries, qrels, f"{root.name}/{split}", bad.n)


# ------------------------------------------------------------------------ SciFact


def parse_sentence_list(s: str) -> list[str]:
    """Sentences from a list literal as SciFact's ``corpus.csv`` stores them.

    The file holds numpy's ``str()`` of an array, ``['a'\\n 'b']`` (no commas), where
    ``ast.literal_eval`` would silently glue adjacent strings together; so each string
    token is read on its own.  Ordinary Python lists (with commas) work too.
    """
    out = []
    toks = tokenize.generate_tokens(io.StringIO(s.strip()).readline)
    for t in toks:
        if t.type == tokenize.STRING:
            value = ast.literal_eval(t.string)
            if not isinstance(value, str):  # b'...' literals
                raise ValueError(f"{t.string[:20]!r} is not a text string")
            if "\\" in t.string:
                try:
                    value.encode("utf-8")
                except UnicodeEncodeError:  # '\ud800': a lone surrogate is not valid Unicode
                    raise ValueError(f"{t.string[:20]!r} holds a lone surrogate") from None
            out.append(value)
        elif t.type == tokenize.OP and t.string in "[],":
            continue
        elif t.type in (tokenize.NL, tokenize.NEWLINE, tokenize.ENDMARKER, tokenize.INDENT, tokenize.DEDENT):
            continue
        else:
            raise ValueError(f"unexpected {t.string!r} in a list of strings")
    return out


def read_scifact(folder: PathLike, split: str = "train", skip_bad: bool = False) -> Collection:
    """SciFact as shipped in ``shared/data/ir/scifact``.

    ``corpus.csv`` (``doc_id,title,abstract,structured``; the abstract is a list of
    sentences, joined here with single spaces), BEIR ``queries.jsonl`` and
    ``qrels/{split}.tsv`` (only ``train`` is shipped there: 5,183 docs, 809 claims).
    A folder with a BEIR ``corpus.jsonl`` instead is read with :func:`read_beir`.
    """
    root = _folder(folder, "SciFact")
    if not (root / "corpus.csv").is_file() and (root / "corpus.jsonl").is_file():
        return read_beir(root, split, skip_bad)
    layout = "corpus.csv, queries.jsonl and qrels/{split}.tsv (SciFact layout)"
    bad = _Bad(skip_bad)
    cpath = _need(root, "corpus.csv", layout)
    docs, seen = [], set()
    old_limit = csv.field_size_limit()
    csv.field_size_limit(max(old_limit, 1 << 24))
    try:
        reader = csv.reader(io.StringIO(read_text(cpath), newline=""))
        header = next(_csv_rows(reader), None)
        if isinstance(header, csv.Error):
            raise DataFormatError(cpath, 1, f"malformed CSV ({header})", hint="pass SciFact's corpus.csv")
        if not header or [h.strip() for h in header[:3]] != ["doc_id", "title", "abstract"]:
            raise DataFormatError(cpath, 1, f"header {header!r} is not doc_id,title,abstract,...", hint="pass SciFact's corpus.csv")
        start = reader.line_num
        for row in _csv_rows(reader):
            lineno = start + 1
            start = reader.line_num
            if isinstance(row, csv.Error):
                bad(cpath, lineno, f"malformed CSV ({row}); check for an unterminated quote")
                continue
            if not row or not any(c.strip() for c in row):
                continue
            if len(row) < 3:
                bad(cpath, lineno, f"expected at least 3 columns, got {len(row)}")
                continue
            try:
                sentences = parse_sentence_list(row[2])
            except (ValueError, SyntaxError, tokenize.TokenError) as e:
                bad(cpath, lineno, f"abstract is not a list of strings ({e})")
                continue
            did = row[0].strip()
            if did in seen:
                bad(cpath, lineno, f"duplicate document id {did!r}")
                continue
            seen.add(did)
            docs.append(Document(did, row[1].strip(), " ".join(s.strip() for s in sentences if s.strip())))
    finally:
        csv.field_size_limit(old_limit)
    queries = _beir_queries(_need(root, "queries.jsonl", layout), bad)
    qrels = read_beir_qrels(_need(root, f"qrels/{split}.tsv", layout.replace("{split}", split)), _bad=bad)
    return _finish(docs, queries, qrels, f"scifact/{split}", bad.n)


# --------------------------------------------------------------------------- TREC

_TAG = re.compile(r"<(/?)([A-Za-z][\w-]*)[^>]*>")
_DOC = re.compile(r"<DOC>(.*?)</DOC>", re.S | re.I)
_DOCNO = re.compile(r"<DOCNO>\s*(.*?)\s*</DOCNO>", re.S | re.I)
_TOP = re.compile(r"<top>(.*?)</top>", re.S | re.I)
_TOPIC_PREFIX = re.compile(r"^\s*(Number|Topic|Description|Narrative)\s*:\s*", re.I)


def _sgml_fields(block: str) -> dict[str, str]:
    """``{tag: text}`` for a flat SGML block; works with or without closing tags."""
    fields: dict[str, str] = {}
    tags = list(_TAG.finditer(block))
    for i, m in enumerate(tags):
        if m.group(1):
            continue
        end = tags[i + 1].start() if i + 1 < len(tags) else len(block)
        name = m.group(2).lower()
        text = block[m.end() : end].strip()
        fields[name] = f"{fields[name]}\n{text}" if name in fields and text else (text or fields.get(name, ""))
    return fields


def _line_of(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def read_trec_docs(path: PathLike, skip_bad: bool = False, _bad: _Bad | None = None) -> list[Document]:
    """TREC SGML documents: ``<DOC><DOCNO>id</DOCNO> ... </DOC>``.

    The title comes from a ``<TITLE>``/``<HEADLINE>``/``<HEAD>`` field when there is
    one; the text is the ``<TEXT>`` fields if any, else everything but the DOCNO.
    """
    bad = _bad or _Bad(skip_bad)
    p = check_file(path, "TREC documents file")
    raw = read_text(p)
    docs, seen = [], set()
    for m in _DOC.finditer(raw):
        body = m.group(1)
        no = _DOCNO.search(body)
        if not no or not no.group(1):
            bad(p, _line_of(raw, m.start()), "<DOC> without a <DOCNO>")
            continue
        did = no.group(1)
        if did in seen:
            bad(p, _line_of(raw, m.start()), f"duplicate DOCNO {did!r}")
            continue
        seen.add(did)
        rest = body[: no.start()] + body[no.end() :]
        fields = _sgml_fields(rest)
        title = next((fields[k] for k in ("title", "headline", "head") if fields.get(k)), "")
        if "text" in fields:
            text = fields["text"]
        else:
            text = _TAG.sub(" ", rest) if _TAG.search(rest) else rest
        docs.append(Document(did, " ".join(title.split()), text.strip()))
    if not docs:
        raise DataFormatError(p, None, "no <DOC> ... </DOC> blocks found", hint="pass a TREC SGML documents file")
    return docs


def read_trec_topics(path: PathLike, field: str = "title", skip_bad: bool = False, _bad: _Bad | None = None) -> list[Query]:
    """TREC topics ``<top><num>..<title>..<desc>..<narr>..</top>`` (closing tags optional).

    ``field`` picks the query text: ``"title"``, ``"desc"``, ``"narr"`` or a ``+``-joined
    mix such as ``"title+desc"``.  ``Number:``/``Topic:``/``Description:`` prefixes are dropped.
    """
    bad = _bad or _Bad(skip_bad)
    p = check_file(path, "TREC topics file")
    raw = read_text(p)
    out = []
    wanted = [f.strip().lower() for f in field.split("+")]
    for m in _TOP.finditer(raw):
        fields = {k: _TOPIC_PREFIX.sub("", v).strip() for k, v in _sgml_fields(m.group(1)).items()}
        qid = fields.get("num", "")
        text = " ".join(" ".join(fields.get(f, "").split()) for f in wanted).strip()
        if not qid or not text:
            bad(p, _line_of(raw, m.start()), f"topic without <num> or {field} text")
            continue
        out.append(Query(qid, text))
    if not out:
        raise DataFormatError(p, None, "no <top> ... </top> blocks found", hint="pass a TREC topics file")
    return out


def read_trec_qrels(path: PathLike, skip_bad: bool = False, _bad: _Bad | None = None) -> dict[str, dict[str, int]]:
    """TREC qrels: ``qid iteration docno relevance`` per line (whitespace separated)."""
    bad = _bad or _Bad(skip_bad)
    p = check_file(path, "qrels file")
    qrels: dict[str, dict[str, int]] = {}
    for lineno, line in enumerate(read_text(p).split("\n"), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 4:
            bad(p, lineno, f"expected 4 columns (qid iter docno rel), got {len(parts)}")
            continue
        try:
            grade = _grade(parts[3])
        except ValueError:
            bad(p, lineno, f"relevance {parts[3]!r} is not an integer")
            continue
        _add_qrel(qrels, parts[0], parts[2], grade)
    return qrels


def read_trec(
    docs_path: PathLike, topics_path: PathLike, qrels_path: PathLike, topic_field: str = "title", skip_bad: bool = False
) -> Collection:
    """A TREC-format collection from its three files (see the ``read_trec_*`` readers)."""
    bad = _Bad(skip_bad)
    docs = read_trec_docs(docs_path, _bad=bad)
    queries = read_trec_topics(topics_path, topic_field, _bad=bad)
    qrels = read_trec_qrels(qrels_path, _bad=bad)
    return _finish(docs, queries, qrels, Path(docs_path).parent.name, bad.n)


def read_vaswani(folder: PathLike, skip_bad: bool = False, lowercase_queries: bool = True) -> Collection:
    """Vaswani (NPL): ``doc-text.trec``, ``query-text.trec``, ``qrels`` (11,429 docs, 93 queries).

    The source's query texts are upper case while its documents are lower case.  BM25
    and uncased encoders fold case anyway, but a cased subword model (SmolLM2's BPE)
    would see unrelated tokens, so queries are lower-cased unless
    ``lowercase_queries=False``.
    """
    from dataclasses import replace

    root = _folder(folder, "Vaswani")
    layout = "doc-text.trec, query-text.trec and qrels (terrier's vaswani_npl layout)"
    c = read_trec(*(_need(root, n, layout) for n in ("doc-text.trec", "query-text.trec", "qrels")), skip_bad=skip_bad)
    if lowercase_queries:
        c.queries = [replace(q, text=q.text.lower()) for q in c.queries]
    return c


# ----------------------------------------------------------------------- Cranfield

#: Cleverdon's relevance codes -> gains (higher = more relevant).  1 = complete answer,
#: 2 = high relevance, 3 = useful background, 4 = minimum interest, 5 = no interest;
#: -1 marks one unjudged/irrelevant pair per query and is kept as a judged 0.
CRANFIELD_GAINS = {1: 4, 2: 3, 3: 2, 4: 1, 5: 0, -1: 0}

_SMART_FIELD = re.compile(r"^\.([A-Z])(?:[ \t]+(.*))?$")


def read_smart(path: PathLike, skip_bad: bool = False, _bad: _Bad | None = None) -> list[tuple[str, dict[str, str]]]:
    """Records of a SMART file: ``[(".I" value, {"T": .., "A": .., "B": .., "W": ..}), ...]``."""
    bad = _bad or _Bad(skip_bad)
    p = check_file(path, "SMART file")
    records: list[tuple[str, dict[str, list[str]]]] = []
    key = None
    for lineno, line in enumerate(read_text(p).split("\n"), 1):
        m = _SMART_FIELD.match(line.rstrip())
        if m and m.group(1) == "I":
            records.append(((m.group(2) or "").strip(), {}))
            key = None
        elif m and m.group(2) is None:
            if not records:
                bad(p, lineno, f"field .{m.group(1)} before the first .I")
                continue
            key = m.group(1)
            records[-1][1].setdefault(key, [])
        elif records and key is not None:
            records[-1][1][key].append(line)
        elif line.strip():
            bad(p, lineno, "text outside a .I record field")
    return [(rid, {k: "\n".join(v).strip() for k, v in fields.items()}) for rid, fields in records]


def read_cranfield(folder: PathLike, skip_bad: bool = False) -> Collection:
    """Cranfield 1400: ``cran.all.1400``, ``cran.qry``, ``cranqrel`` (1,400 docs, 225 queries).

    Titles come from ``.T`` and texts from ``.W`` (which repeats the title, as in the
    source).  Two records, 471 and 995, are empty; they are kept because qrels point
    at 995.  Quirk: ``cranqrel`` numbers queries 1..225 in file order, while
    ``cran.qry``'s ``.I`` numbers run 001..365 with gaps; so query ids here are the file
    positions ``"1".."225"`` (the i-th query in ``cran.qry`` has id ``str(i)``,
    whatever its ``.I``).  Grades follow :data:`CRANFIELD_GAINS` (1->4, 2->3, 3->2,
    4->1, 5 and -1 -> 0).
    """
    root = _folder(folder, "Cranfield")
    layout = "cran.all.1400, cran.qry and cranqrel"
    bad = _Bad(skip_bad)
    docs = []
    for rid, f in read_smart(_need(root, "cran.all.1400", layout), _bad=bad):
        docs.append(Document((rid.lstrip("0") or "0") if rid.isascii() and rid.isdigit() else rid, " ".join(f.get("T", "").split()), f.get("W", "")))
    queries = [
        Query(str(i), " ".join(f.get("W", "").split()))
        for i, (_, f) in enumerate(read_smart(_need(root, "cran.qry", layout), _bad=bad), 1)
    ]
    qpath = _need(root, "cranqrel", layout)
    qrels: dict[str, dict[str, int]] = {}
    for lineno, line in enumerate(read_text(qpath).split("\n"), 1):
        parts = line.split()
        if not parts:
            continue
        try:
            if len(parts) != 3:
                raise ValueError(f"expected 3 columns (qid docid grade), got {len(parts)}")
            code = int(parts[2])
            if code not in CRANFIELD_GAINS:
                raise ValueError(f"unknown relevance code {code} (expected 1..5 or -1)")
            _add_qrel(qrels, str(int(parts[0])), str(int(parts[1])), CRANFIELD_GAINS[code])
        except ValueError as e:
            bad(qpath, lineno, str(e))
    return _finish(docs, queries, qrels, "cranfield", bad.n)


# -------------------------------------------------------------------------- BRIGHT


def _id_list(value) -> list[str]:
    """BRIGHT id lists: a list, a single string, or ``"N/A"``/``["N/A"]`` for none."""
    if value is None:
        return []
    if not isinstance(value, (str, list, tuple)):
        raise ValueError(f"expected a list of ids or a string, got {type(value).__name__}")
    items = [value] if isinstance(value, str) else value
    return [str(v) for v in items if str(v).strip() and str(v).strip().upper() != "N/A"]


def _bright_files(path, task: str | None, long_context: bool) -> tuple[Path, Path]:
    if isinstance(path, (tuple, list)):
        if len(path) != 2:
            raise InputError("pass BRIGHT as a folder or as (documents.jsonl, examples.jsonl)")
        return check_file(path[0], "BRIGHT documents file"), check_file(path[1], "BRIGHT examples file")
    root = _folder(path, "BRIGHT")
    dname = "long_documents" if long_context else "documents"
    cands = [(f"{dname}/{task}.jsonl", f"examples/{task}.jsonl")] if task else []
    cands += [(f"{dname}.jsonl", "examples.jsonl")]
    for d, e in cands:
        if (root / d).is_file() and (root / e).is_file():
            return root / d, root / e
    if list(root.rglob("*.parquet")):
        raise InputError(f"{root} holds parquet files; convert them to JSON Lines (documents.jsonl, examples.jsonl)")
    want = " or ".join(f"{d} + {e}" for d, e in cands)
    raise InputError(f"{root} has no BRIGHT files; expected {want}")


def read_bright(
    folder_or_files: PathLike | tuple[PathLike, PathLike],
    task: str | None = None,
    long_context: bool = False,
    skip_bad: bool = False,
) -> Collection:
    """BRIGHT: ``documents`` rows (``id``, ``content``) and ``examples`` rows (``id``,
    ``query``, ``gold_ids``, ``gold_ids_long``, ``excluded_ids``, ...), as JSON Lines.

    ``folder_or_files`` is a folder with ``documents.jsonl`` + ``examples.jsonl`` (or
    ``documents/{task}.jsonl`` + ``examples/{task}.jsonl``; ``long_documents`` with
    ``long_context``) or a ``(documents, examples)`` pair.  Gold ids become grade-1
    qrels (``gold_ids_long`` when ``long_context``); ``excluded_ids`` (``"N/A"`` = none)
    go to ``Query.excluded_ids`` and must be removed from rankings before scoring, as
    BRIGHT's ``run.py`` does.  An id both gold and excluded is a malformed row.
    """
    dpath, epath = _bright_files(folder_or_files, task, long_context)
    bad = _Bad(skip_bad)
    rows, n = read_jsonl_numbered(dpath, skip_bad)
    bad.n += n
    docs, seen = [], set()
    for lineno, row in rows:
        did, content = row.get("id"), row.get("content")
        if did is None or not isinstance(content, str):
            bad(dpath, lineno, 'a document row needs "id" and a string "content"')
            continue
        if str(did) in seen:
            bad(dpath, lineno, f"duplicate document id {did!r}")
            continue
        seen.add(str(did))
        docs.append(Document(str(did), "", content))
    rows, n = read_jsonl_numbered(epath, skip_bad)
    bad.n += n
    gold_key = "gold_ids_long" if long_context else "gold_ids"
    queries, qrels = [], {}
    for lineno, row in rows:
        qid, text = row.get("id"), row.get("query")
        if qid is None or not isinstance(text, str) or gold_key not in row:
            bad(epath, lineno, f'an example row needs "id", a string "query" and "{gold_key}"')
            continue
        try:
            gold, excluded = _id_list(row[gold_key]), _id_list(row.get("excluded_ids"))
        except ValueError as e:
            bad(epath, lineno, f'"{gold_key}"/"excluded_ids": {e}')
            continue
        both = set(gold) & set(excluded)
        if both:
            bad(epath, lineno, f"ids both gold and excluded: {sorted(both)[:3]}")
            continue
        queries.append(Query(str(qid), text, tuple(excluded)))
        for g in gold:
            _add_qrel(qrels, str(qid), g, 1)
    name = f"bright/{task}" if task else "bright"
    return _finish(docs, queries, qrels, name, bad.n)

