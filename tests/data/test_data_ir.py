"""IR collection readers: exact counts on the shared data, formats and errors on tiny files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tessera.data.ir import (
    CRANFIELD_GAINS,
    parse_sentence_list,
    read_beir,
    read_bright,
    read_cranfield,
    read_scifact,
    read_trec,
    read_vaswani,
)
from tessera.data.paths import shared_data_dir
from tessera.errors import DataFormatError, InputError


def shared(*parts: str) -> Path:
    root = shared_data_dir()
    if root is None or not root.joinpath(*parts).exists():
        pytest.skip(f"../shared/data/{'/'.join(parts)} not found (shared evaluation data absent)")
    return root.joinpath(*parts)


def _check_consistent(c):
    assert len({d.id for d in c.docs}) == len(c.docs)
    assert len({q.id for q in c.queries}) == len(c.queries)
    assert set(c.qrels) == {q.id for q in c.queries}
    ids = c.doc_by_id()
    assert all(d in ids for judged in c.qrels.values() for d in judged)
    assert c.n_skipped == 0


# ----------------------------------------------------------------- shared data


@pytest.fixture(scope="module")
def cranfield():
    return read_cranfield(shared("ir", "cranfield"))


def test_cranfield_counts(cranfield):
    assert len(cranfield.docs) == 1400 and len(cranfield.queries) == 225
    assert sum(len(v) for v in cranfield.qrels.values()) == 1837
    _check_consistent(cranfield)


def test_cranfield_spot_values(cranfield):
    d1 = cranfield.docs[0]
    assert d1.id == "1"
    assert d1.title == "experimental investigation of the aerodynamics of a wing in a slipstream ."
    assert d1.text.startswith("experimental investigation of the aerodynamics")
    ids = cranfield.doc_by_id()
    assert ids["471"].text == "" and ids["995"].text == ""  # empty records kept: qrels point at 995
    assert cranfield.qrels["125"]["995"] == CRANFIELD_GAINS[3]


def test_cranfield_query_ids_are_file_order(cranfield):
    # cran.qry's .I numbers are 001, 002, 004, 008, ... 365; qrels use positions 1..225.
    assert [q.id for q in cranfield.queries] == [str(i) for i in range(1, 226)]
    assert cranfield.queries[2].text.startswith("what problems of heat conduction in composite slabs")  # .I 004
    assert cranfield.queries[-1].text.startswith("what design factors can be used to control lift-drag ratios")  # .I 365
    q1 = cranfield.qrels["1"]
    assert q1["184"] == 3 and q1["12"] == 2 and q1["486"] == 0  # codes 2, 3 and -1


def test_cranfield_grades_are_gains(cranfield):
    grades = [g for v in cranfield.qrels.values() for g in v.values()]
    assert set(grades) == {0, 1, 2, 3, 4}
    assert grades.count(0) == 225 and grades.count(4) == 128  # 225 rows of -1, 128 of code 1


def test_vaswani():
    c = read_vaswani(shared("ir", "vaswani"))
    assert len(c.docs) == 11429 and len(c.queries) == 93
    assert sum(len(v) for v in c.qrels.values()) == 2083
    _check_consistent(c)
    assert c.docs[0].id == "1" and c.docs[0].text.startswith("compact memories have flexible capacities")
    assert c.docs[-1].id == "11429"
    assert c.queries[0].id == "1"
    assert c.queries[0].text == "measurement of dielectric constant of liquids by the use of microwave techniques"
    raw = read_vaswani(shared("ir", "vaswani"), lowercase_queries=False)
    assert raw.queries[0].text == "MEASUREMENT OF DIELECTRIC CONSTANT OF LIQUIDS BY THE USE OF MICROWAVE TECHNIQUES"
    assert set(g for v in c.qrels.values() for g in v.values()) == {1}


def test_scifact():
    c = read_scifact(shared("ir", "scifact"))
    assert len(c.docs) == 5183 and len(c.queries) == 809
    assert sum(len(v) for v in c.qrels.values()) == 919
    _check_consistent(c)
    d = c.docs[0]
    assert d.id == "4983" and d.title.startswith("Microstructural development of human newborn cerebral white matter")
    # sentences joined with single spaces (not glued, as ast.literal_eval of numpy's repr would)
    assert d.text.startswith(
        "Alterations of the architecture of cerebral white matter in the developing human brain can affect "
        "cortical development and result in functional disabilities. A line scan diffusion-weighted"
    )
    assert c.queries[0].id == "0" and c.queries[0].text == "0-dimensional biomaterials lack inductive properties."
    assert c.qrels["0"] == {"31715818": 1}


# ---------------------------------------------------------------- tiny files


def test_parse_sentence_list_numpy_repr_and_python_list():
    assert parse_sentence_list("['a b.'\n 'c \\'d\\'.'\n \"e's.\"]") == ["a b.", "c 'd'.", "e's."]
    assert parse_sentence_list("['x', 'y']") == ["x", "y"]
    with pytest.raises(ValueError):
        parse_sentence_list("[foo]")


def _beir(tmp_path: Path, corpus: str) -> Path:
    (tmp_path / "qrels").mkdir()
    (tmp_path / "corpus.jsonl").write_text(corpus)
    (tmp_path / "queries.jsonl").write_text('{"_id": "q1", "text": "first"}\n{"_id": "q2", "text": "unjudged"}\n')
    (tmp_path / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\nq1\td2\t2\n")
    return tmp_path


def test_beir_small(tmp_path):
    root = _beir(tmp_path, '{"_id": "d1", "title": "T", "text": "one"}\n{"_id": 2, "text": "two"}\n')
    c = read_beir(root)
    assert [d.id for d in c.docs] == ["d1", "2"] and c.docs[1].title == ""
    assert [q.id for q in c.queries] == ["q1"]  # q2 has no qrels in this split
    assert c.qrels == {"q1": {"d1": 1, "d2": 2}}


def test_beir_bad_rows(tmp_path):
    root = _beir(tmp_path, '{"_id": "d1", "text": "one"}\n{"title": "no id"}\n{"_id": "d3", "text": "x"\n')
    with pytest.raises(DataFormatError, match=r"corpus\.jsonl:3: malformed JSON \(Expecting ',' delimiter at column"):
        read_beir(root)
    c = read_beir(root, skip_bad=True)
    assert [d.id for d in c.docs] == ["d1"] and c.n_skipped == 2
    (root / "corpus.jsonl").write_text('{"_id": "d1", "text": "one"}\n{"title": "no id"}\n')
    with pytest.raises(DataFormatError, match=r'corpus\.jsonl:2: a corpus row needs "_id"'):
        read_beir(root)


def test_beir_missing_split(tmp_path):
    root = _beir(tmp_path, '{"_id": "d1", "text": "one"}\n')
    with pytest.raises(InputError, match=r"qrels/dev\.tsv not found"):
        read_beir(root, split="dev")
    with pytest.raises(InputError, match="not found"):
        read_beir(tmp_path / "nope")


def test_bad_qrels_score(tmp_path):
    root = _beir(tmp_path, '{"_id": "d1", "text": "one"}\n')
    (root / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\tyes\n")
    with pytest.raises(DataFormatError, match=r"test\.tsv:2: score"):
        read_beir(root)


def test_trec_small_with_classic_topics(tmp_path):
    (tmp_path / "docs.trec").write_text(
        "<DOC>\n<DOCNO> A1 </DOCNO>\n<HEADLINE>Head line</HEADLINE>\n<TEXT>\nbody one\n</TEXT>\n</DOC>\n"
        "<DOC>\n<DOCNO>A2</DOCNO>\nplain body\n</DOC>\n"
    )
    (tmp_path / "topics").write_text(
        "<top>\n<num> Number: 401\n<title> foreign minorities\n\n<desc> Description:\nWhat language?\n</top>\n"
        "<top>\n<num> Number: 402\n<title> unjudged\n</top>\n"
    )
    (tmp_path / "qrels").write_text("401 0 A1 1\n401 0 A2 0\n")
    c = read_trec(tmp_path / "docs.trec", tmp_path / "topics", tmp_path / "qrels")
    assert [(d.id, d.title, d.text) for d in c.docs] == [("A1", "Head line", "body one"), ("A2", "", "plain body")]
    assert [(q.id, q.text) for q in c.queries] == [("401", "foreign minorities")]
    assert c.qrels == {"401": {"A1": 1, "A2": 0}}
    c2 = read_trec(tmp_path / "docs.trec", tmp_path / "topics", tmp_path / "qrels", topic_field="title+desc")
    assert c2.queries[0].text == "foreign minorities What language?"


def test_trec_bad_qrels_line(tmp_path):
    (tmp_path / "d").write_text("<DOC><DOCNO>1</DOCNO>x</DOC>")
    (tmp_path / "t").write_text("<top><num>1</num><title>q</title></top>")
    (tmp_path / "q").write_text("1 0 1 1\n1 1\n")
    with pytest.raises(DataFormatError, match=r"q:2: expected 4 columns"):
        read_trec(tmp_path / "d", tmp_path / "t", tmp_path / "q")
    assert read_trec(tmp_path / "d", tmp_path / "t", tmp_path / "q", skip_bad=True).n_skipped == 1


def test_cranfield_small_and_unknown_code(tmp_path):
    (tmp_path / "cran.all.1400").write_text(".I 1\n.T\ntitle one\n.A\nx\n.W\nbody\none .\n.I 2\n.T\n.W\nbody two\n")
    (tmp_path / "cran.qry").write_bytes(b".I 001\r\n.W\r\nfirst query\r\n.I 007\r\n.W\r\nsecond\r\n")
    (tmp_path / "cranqrel").write_text("1 1 1\n2 2 4\n2 1 -1\n")
    c = read_cranfield(tmp_path)
    assert [(d.id, d.title, d.text) for d in c.docs] == [("1", "title one", "body\none ."), ("2", "", "body two")]
    assert [(q.id, q.text) for q in c.queries] == [("1", "first query"), ("2", "second")]
    assert c.qrels == {"1": {"1": 4}, "2": {"2": 1, "1": 0}}
    (tmp_path / "cranqrel").write_text("1 1 1\n1 2 7\n")
    with pytest.raises(DataFormatError, match=r"cranqrel:2: unknown relevance code 7"):
        read_cranfield(tmp_path)


def _jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _bright_rows():
    docs = [{"id": f"d{i}", "content": f"document {i}"} for i in range(4)]
    examples = [
        {"id": "0", "query": "why?", "reasoning": "", "gold_ids": ["d1", "d2"], "gold_ids_long": ["d1"], "excluded_ids": ["N/A"]},
        {"id": "1", "query": "how?", "gold_ids": ["d3"], "gold_ids_long": ["d3"], "excluded_ids": ["d0", "d2"]},
        {"id": "2", "query": "no gold", "gold_ids": [], "gold_ids_long": [], "excluded_ids": "N/A"},
    ]
    return docs, examples


def test_bright_folder_and_pair(tmp_path):
    docs, examples = _bright_rows()
    dp = _jsonl(tmp_path / "documents.jsonl", docs)
    ep = _jsonl(tmp_path / "examples.jsonl", examples)
    for src in (tmp_path, (dp, ep)):
        c = read_bright(src)
        assert [d.id for d in c.docs] == ["d0", "d1", "d2", "d3"] and c.docs[0].text == "document 0"
        assert [q.id for q in c.queries] == ["0", "1"]
        assert c.queries[0].excluded_ids == () and c.queries[1].excluded_ids == ("d0", "d2")
        assert c.qrels == {"0": {"d1": 1, "d2": 1}, "1": {"d3": 1}}


def test_bright_task_layout_and_long(tmp_path):
    docs, examples = _bright_rows()
    (tmp_path / "long_documents").mkdir()
    (tmp_path / "examples").mkdir()
    _jsonl(tmp_path / "long_documents" / "biology.jsonl", docs)
    _jsonl(tmp_path / "examples" / "biology.jsonl", examples)
    c = read_bright(tmp_path, task="biology", long_context=True)
    assert c.qrels["0"] == {"d1": 1} and c.name == "bright/biology"
    with pytest.raises(InputError, match="no BRIGHT files"):
        read_bright(tmp_path, task="biology")


def test_bright_gold_and_excluded_overlap_is_malformed(tmp_path):
    docs, examples = _bright_rows()
    examples[1]["excluded_ids"] = ["d3"]
    _jsonl(tmp_path / "documents.jsonl", docs)
    _jsonl(tmp_path / "examples.jsonl", examples)
    with pytest.raises(DataFormatError, match=r"examples\.jsonl:2: ids both gold and excluded"):
        read_bright(tmp_path)
    assert read_bright(tmp_path, skip_bad=True).n_skipped == 1
