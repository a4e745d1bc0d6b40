"""QA sets, text corpora and image readers."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from tessera.data.images import load_digits_8x8, read_mnist
from tessera.data.paths import shared_data_dir
from tessera.data.qa import read_hotpotqa, read_mmlu
from tessera.data.text import load_corpus, load_corpus_counted, python_docs_corpus, read_wikitext
from tessera.errors import DataFormatError, EmptyCorpusError, InputError


def shared(*parts: str) -> Path:
    root = shared_data_dir()
    if root is None or not root.joinpath(*parts).exists():
        pytest.skip(f"../shared/data/{'/'.join(parts)} not found (shared evaluation data absent)")
    return root.joinpath(*parts)


# ---------------------------------------------------------------------- QA


def test_hotpotqa_shared():
    ex = read_hotpotqa(shared("hotpotqa", "hotpot_dev_distractor_v1_first40.json"))
    assert len(ex) == 40
    e = ex[0]
    assert e.id == "5a8b57f25542995d1e6f1371" and e.answer == "yes" and e.type == "comparison" and e.level == "hard"
    assert e.question == "Were Scott Derrickson and Ed Wood of the same nationality?"
    assert e.supporting_facts == [("Scott Derrickson", 0), ("Ed Wood", 0)]
    assert e.context[0][0] == "Ed Wood (film)" and len(e.context) == 10
    # every supporting fact points at an existing sentence
    assert all(len(x.supporting_sentences()) == len(x.supporting_facts) for x in ex)
    assert e.supporting_sentences()[0][2].startswith("Scott Derrickson (born July 16, 1966)")


def test_hotpotqa_errors(tmp_path):
    with pytest.raises(InputError, match="not found"):
        read_hotpotqa(tmp_path / "missing.json")
    (tmp_path / "obj.json").write_text('{"a": 1}')
    with pytest.raises(DataFormatError, match="expected a JSON list"):
        read_hotpotqa(tmp_path / "obj.json")
    (tmp_path / "bad.json").write_text(json.dumps([{"_id": "x", "question": "q"}]))
    with pytest.raises(DataFormatError, match="example 0 is malformed"):
        read_hotpotqa(tmp_path / "bad.json")


def test_mmlu_shared_counts():
    root = shared("mmlu")
    dev, val = read_mmlu(root, "dev"), read_mmlu(root, "val")
    assert len(dev) == 285 and len(val) == 1531
    assert len({q.subject for q in dev}) == 57 == len({q.subject for q in val})
    assert all(len(q.choices) == 4 and q.answer in "ABCD" for q in dev + val)
    assert len({q.id for q in val}) == len(val)
    q = dev[0]
    assert q.id == "abstract_algebra/dev/0" and q.subject == "abstract_algebra"
    assert q.question == "Find all c in Z_3 such that Z_3[x]/(x^2 + c) is a field."
    assert q.choices == ("0", "1", "2", "3") and q.answer == "B" and q.answer_index == 1
    assert len(read_mmlu(root, "dev", subjects=["anatomy", "virology"])) == 10


def test_mmlu_small_and_errors(tmp_path):
    (tmp_path / "val").mkdir()
    (tmp_path / "val" / "law_val.csv").write_bytes(b'"Q, with comma\nand newline",a,b,c,d,C\r\nQ2,a,b,c,d,A')
    qs = read_mmlu(tmp_path)
    assert [(q.question, q.answer) for q in qs] == [("Q, with comma\nand newline", "C"), ("Q2", "A")]
    assert qs[1].id == "law/val/1"
    (tmp_path / "val" / "zoo_val.csv").write_text("Q,a,b,c,d,A\nQ2,a,b,c,E\n")
    with pytest.raises(DataFormatError, match=r"zoo_val\.csv:2:"):
        read_mmlu(tmp_path)
    assert len(read_mmlu(tmp_path, skip_bad=True)) == 3
    with pytest.raises(InputError, match="unknown MMLU subject"):
        read_mmlu(tmp_path, subjects=["nope"])
    with pytest.raises(InputError, match="not found"):
        read_mmlu(tmp_path, split="test")


# --------------------------------------------------------------------- text


def test_wikitext_shared():
    test = read_wikitext(shared("wikitext2", "test.txt"))
    valid = read_wikitext(shared("wikitext2", "valid.txt"))
    raw = read_wikitext(shared("wikitext2", "wiki.test.raw"))  # CRLF, blank lines dropped
    assert (len(test), len(valid), len(raw)) == (62, 60, 62)
    assert test[0].title == "Robert <unk>" and raw[0].title == "Robert Boulter" and valid[0].title == "Homarus gammarus"
    assert raw[1].title == "Du Fu" and raw[-1].title == "The Hustler ( film )"
    assert raw[0].text.startswith("Robert Boulter is an English film , television and theatre actor .")
    assert "\r" not in raw[0].text and "\nCareer\n" in raw[0].text  # sub-heading kept without "= ="
    # no heading markup left ("= Qualified for the next round" is a real table-legend line)
    assert not any(line.startswith("=") and line.endswith("=") for d in raw for line in d.text.split("\n"))


def test_wikitext_small(tmp_path):
    p = tmp_path / "w.raw"
    p.write_bytes(b" = A = \r\n para one \r\n = = Sub = = \r\n = x not a heading \r\n = B = \r\n two \r\n")
    docs = read_wikitext(p)
    assert [(d.id, d.title, d.text) for d in docs] == [("0", "A", "para one\nSub\n= x not a heading"), ("1", "B", "two")]


def test_load_corpus_jsonl(tmp_path):
    p = tmp_path / "c.jsonl"
    p.write_text('{"id": "a", "title": "T", "text": "alpha"}\n{"contents": "beta"}\n{"_id": 7, "text": "   "}\n')
    docs = load_corpus(p)
    assert [(d.id, d.title, d.text) for d in docs] == [("a", "T", "alpha"), ("2", "", "beta")]


def test_load_corpus_bad_rows(tmp_path):
    p = tmp_path / "c.jsonl"
    p.write_text('{"id": "a", "text": "alpha"}\n{"id": "b"}\n{oops\n')
    with pytest.raises(DataFormatError, match=r"c\.jsonl:3:"):
        load_corpus(p)
    docs, n_bad = load_corpus_counted(p, skip_bad=True)
    assert [d.id for d in docs] == ["a"] and n_bad == 2
    p.write_text('{"id": "a", "text": "alpha"}\n{"id": "a", "text": "again"}\n')
    with pytest.raises(InputError, match="duplicate document id 'a'"):
        load_corpus(p)


def test_load_corpus_files_and_folders(tmp_path):
    (tmp_path / "one.txt").write_text("just text")
    assert [(d.id, d.text) for d in load_corpus(tmp_path / "one.txt")] == [("one.txt", "just text")]
    root = tmp_path / "docs"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "b.md").write_text("# Guide\n\nSome words.\n")
    (root / "a.rst").write_text("Rst body\n")
    (root / "rows.jsonl").write_text('{"text": "row one"}\n{"id": "r2", "text": "row two"}\n')
    (root / "skip.pdf").write_bytes(b"%PDF")
    (root / ".hidden").mkdir()
    (root / ".hidden" / "x.txt").write_text("hidden")
    (root / "empty.txt").write_text("  \n")
    docs = load_corpus(root)
    assert [d.id for d in docs] == ["a.rst", "rows.jsonl:1", "r2", "sub/b.md"]
    assert docs[-1].title == "Guide" and docs[-1].text == "# Guide\n\nSome words.\n"


def test_load_corpus_beir_folder(tmp_path):
    (tmp_path / "corpus.jsonl").write_text('{"_id": "d1", "title": "T", "text": "x"}\n')
    (tmp_path / "notes.txt").write_text("ignored: a BEIR folder is read through corpus.jsonl")
    assert [(d.id, d.title) for d in load_corpus(tmp_path)] == [("d1", "T")]


def test_load_corpus_errors(tmp_path):
    with pytest.raises(InputError, match="not found; check the path"):
        load_corpus(tmp_path / "missing")
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9\n")
    with pytest.raises(InputError) as e:
        load_corpus(tmp_path / "latin1.txt")
    assert "latin1.txt:1" in str(e.value) and "convert the file to UTF-8" in str(e.value)
    (tmp_path / "x.pdf").write_bytes(b"%PDF")
    with pytest.raises(InputError, match="unsupported corpus file"):
        load_corpus(tmp_path / "x.pdf")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(EmptyCorpusError, match="has no documents"):
        load_corpus(empty)
    (empty / "blank.txt").write_text("\n\n")
    (empty / "rows.jsonl").write_text('{"text": ""}\n')
    with pytest.raises(EmptyCorpusError, match="has no documents"):
        load_corpus(empty)


def test_python_docs_corpus():
    docs = python_docs_corpus()
    assert len(docs) > 50 and sum(len(d.text) for d in docs) > 100_000
    by_id = {d.id: d for d in docs}
    assert by_id["assert"].title == 'The "assert" statement'
    assert "assert_stmt" in by_id["assert"].text
    assert len(by_id) == len(docs)


# ------------------------------------------------------------------- images


def test_mnist_shared():
    images, labels = read_mnist(shared("mnist"))
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (10000,) and set(labels.tolist()) == set(range(10))
    assert labels[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
    assert images.max() == 255 and images[0].sum() > 0


def _idx(tmp_path: Path, n: int, img_magic: int = 2051, lab_magic: int = 2049, n_labels: int | None = None) -> Path:
    imgs = np.arange(n * 28 * 28, dtype=np.uint8).tobytes()
    head = b"".join(int(x).to_bytes(4, "big") for x in (img_magic, n, 28, 28))
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(head + imgs))
    nl = n if n_labels is None else n_labels
    lab = b"".join(int(x).to_bytes(4, "big") for x in (lab_magic, nl)) + bytes(range(nl))
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(lab))
    return tmp_path


def test_mnist_small_and_errors(tmp_path):
    images, labels = read_mnist(_idx(tmp_path, 3))
    assert images.shape == (3, 28, 28) and labels.tolist() == [0, 1, 2]
    with pytest.raises(InputError, match="magic number"):
        read_mnist(_idx(tmp_path, 3, img_magic=2049))
    with pytest.raises(InputError, match="magic number"):
        read_mnist(_idx(tmp_path, 3, lab_magic=2051))
    with pytest.raises(InputError, match="has 3 images but .* has 2 labels"):
        read_mnist(_idx(tmp_path, 3, n_labels=2))
    with pytest.raises(InputError, match="not found"):
        read_mnist(tmp_path, split="train")
    with pytest.raises(InputError, match="unknown MNIST split"):
        read_mnist(tmp_path, split="val")


def test_digits_8x8():
    images, labels = load_digits_8x8()
    assert images.shape == (1797, 8, 8) and images.min() == 0 and images.max() == 16
    assert labels.shape == (1797,) and set(labels.tolist()) == set(range(10))
