"""BTX domains: named text sources, tokenized into fixed-length blocks with a held-out split.

A domain is written ``name:source`` (in configs and on the command line).  ``source`` is

- ``wikitext2``: WikiText-2 from the shared data: the articles of ``valid.txt`` and
  ``test.txt`` (the two files share no article), split per article by a hash of its title
  (the 16 articles titled only ``<unk>`` / ``<unk> <unk>`` share two keys, both in training).
  Until testbed v3 this source trained on ``valid.txt`` and held out ``test.txt``: experts
  branched before then have seen 6 of today's 11 held-out articles;
- ``scifact``: SciFact's 5,183 biomedical abstracts (title + abstract) from the shared
  data (``ir/scifact/corpus.csv``);
- ``mmlu``: MMLU questions from the shared data formatted as ``Question/A-D/Answer``
  (train on the ``val`` split, hold out ``dev``);
- ``python-docs``: Python's documentation topics (``pydoc_data.topics``);
- ``python-code``: the hand-written source files of this Python's standard library (no
  tests, and not the generated ``encodings`` charmap tables or ``pydoc_data`` topic text,
  which would make the domain mostly machine-written and trivially predictable);
- a ``.jsonl`` / ``.txt`` / ``.md`` / ``.rst`` file or a folder of them (:func:`tessera.data.load_corpus`).

Sources other than ``mmlu`` are split per document by a hash of the document id (the
title for ``wikitext2``; ``heldout_fraction``), so the split never depends on file order or on
which other domains are present.  Each split's documents are tokenized, joined with
EOS and cut into ``seq_len`` blocks (the BTX paper trains on packed sequences).
"""

from __future__ import annotations

import hashlib
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from tessera.errors import EmptyCorpusError, InputError

BUILTIN_SOURCES = ("wikitext2", "scifact", "mmlu", "python-docs", "python-code")
DEFAULT_DOMAINS = ("wiki:wikitext2", "mmlu:mmlu", "code:python-code")


@dataclass(frozen=True)
class Domain:
    """One BTX domain: a name (the expert's name) and where its text comes from."""

    name: str
    source: str

    @classmethod
    def parse(cls, spec: str) -> Domain:
        """``"name:source"`` (or a bare builtin source, named after itself) -> :class:`Domain`."""
        spec = str(spec).strip()
        if ":" in spec:
            name, source = spec.split(":", 1)
        elif spec in BUILTIN_SOURCES:
            name, source = spec, spec
        else:
            raise InputError(f"domain '{spec}' is not name:source; write e.g. code:python-code or mydocs:/path/to/corpus.jsonl")
        name, source = name.strip(), source.strip()
        if not name or not source or not name.replace("-", "").replace("_", "").isalnum():
            raise InputError(f"domain '{spec}': the name must be letters/digits/-/_ and the source non-empty; e.g. code:python-code")
        return cls(name, source)


def parse_domains(specs) -> list[Domain]:
    domains = [Domain.parse(s) for s in specs]
    if not domains:
        raise InputError("no domains given; pass e.g. domains=[wiki:wikitext2,code:python-code]")
    names = [d.name for d in domains]
    if len(set(names)) != len(names):
        raise InputError(f"domain names repeat ({names}); give every domain a unique name")
    return domains


def _held_out(doc_id: str, fraction: float) -> bool:
    h = int(hashlib.sha1(doc_id.encode("utf-8")).hexdigest()[:8], 16)
    return (h % 10_000) < fraction * 10_000


def _shared(*parts: str) -> Path:
    from tessera.data.paths import shared_data_dir

    root = shared_data_dir()
    if root is None or not root.joinpath(*parts).exists():
        raise InputError(f"../shared/data/{'/'.join(parts)} not found; use another source (python-docs, python-code or a corpus path)")
    return root.joinpath(*parts)


def _mmlu_text(q) -> str:
    return f"Question: {q.question}\n" + "".join(f"{c}. {t}\n" for c, t in zip("ABCD", q.choices)) + f"Answer: {q.answer}"


def stdlib_code_files() -> list[Path]:
    """The standard library's own hand-written ``.py`` files (no tests, no site-packages, no
    generated ``encodings``/``pydoc_data`` files), sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = ("site-packages", "test", "tests", "idle_test", "__pycache__", "encodings", "pydoc_data")
    files = [p for p in sorted(root.rglob("*.py")) if not any(part in skip for part in p.relative_to(root).parts)]
    if not files:
        raise InputError(f"no standard-library sources under {root}; use another source")
    return files


def domain_texts(domain: Domain, heldout_fraction: float = 0.1) -> tuple[list[str], list[str]]:
    """``(train_texts, heldout_texts)`` for a domain (see the module docstring for the splits)."""
    src = domain.source
    if src == "mmlu":
        from tessera.data.qa import read_mmlu

        root = _shared("mmlu")
        return [_mmlu_text(q) for q in read_mmlu(root, "val")], [_mmlu_text(q) for q in read_mmlu(root, "dev")]
    if src == "wikitext2":
        from tessera.data.text import read_wikitext

        docs = [(d.title, d.text) for f in ("valid.txt", "test.txt") for d in read_wikitext(_shared("wikitext2", f))]
    elif src == "scifact":
        from tessera.data.ir import read_scifact

        docs = [(d.id, f"{d.title}\n{d.text}" if d.title else d.text) for d in read_scifact(_shared("ir", "scifact")).docs]
    elif src == "python-docs":
        from tessera.data.text import python_docs_corpus

        docs = [(d.id, d.text) for d in python_docs_corpus()]
    elif src == "python-code":
        root = Path(sysconfig.get_paths()["stdlib"])
        docs = []
        for p in stdlib_code_files():
            try:
                docs.append((p.relative_to(root).as_posix(), p.read_text(encoding="utf-8")))
            except (UnicodeDecodeError, OSError):
                continue
    else:
        from tessera.data.text import load_corpus

        docs = [(d.id, (d.title + "\n" + d.text) if d.title else d.text) for d in load_corpus(src)]
    train = [t for i, t in docs if not _held_out(i, heldout_fraction)]
    held = [t for i, t in docs if _held_out(i, heldout_fraction)]
    if not train or not held:
        raise EmptyCorpusError(f"domain '{domain.name}' ({src}) has too few documents for a train/held-out split; add documents")
    return train, held


def pack_blocks(texts: list[str], tokenizer, seq_len: int, max_blocks: int | None = None):
    """Tokenize, join with EOS and cut into ``[n, seq_len]`` blocks (a LongTensor); stops at ``max_blocks``."""
    import torch

    eos = tokenizer.eos_token_id
    ids: list[int] = []
    need = None if not max_blocks else max_blocks * seq_len
    for t in texts:
        ids.extend(tokenizer(t, add_special_tokens=False)["input_ids"])
        ids.append(eos)
        if need is not None and len(ids) >= need:
            break
    n = len(ids) // seq_len
    if max_blocks:
        n = min(n, max_blocks)
    if n == 0:
        raise EmptyCorpusError(f"the text holds fewer than seq_len={seq_len} tokens; add text or lower seq_len")
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


def _spread(texts: list[str], seed: int) -> list[str]:
    """Documents in a fixed pseudo-random order, so a block budget samples the whole domain, not its first files."""
    import random

    out = list(texts)
    random.Random(seed).shuffle(out)
    return out


def domain_blocks(domain: Domain, tokenizer, seq_len: int, max_train_blocks: int | None = None,
                  max_eval_blocks: int | None = None, heldout_fraction: float = 0.1, seed: int = 0):
    """``(train_blocks, eval_blocks)`` LongTensors for one domain."""
    train, held = domain_texts(domain, heldout_fraction)
    return (pack_blocks(_spread(train, seed), tokenizer, seq_len, max_train_blocks),
            pack_blocks(_spread(held, seed + 1), tokenizer, seq_len, max_eval_blocks))


class BlockDataset:
    """Fixed-length token blocks as a map-style dataset for the HF Trainer (labels = inputs)."""

    def __init__(self, blocks):
        self.blocks = blocks

    def __len__(self) -> int:
        return int(self.blocks.shape[0])

    def __getitem__(self, i):
        x = self.blocks[i]
        return {"input_ids": x, "labels": x.clone()}
