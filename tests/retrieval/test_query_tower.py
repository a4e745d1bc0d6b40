"""Query-side fine-tuning against a frozen document encoder, on the embedded MiniLM."""

from __future__ import annotations

import numpy as np
import pytest

from tessera.data.types import Document
from tessera.errors import InputError
from tessera.retrieval.dense_index import encode_queries
from tessera.retrieval.query_tower import Candidates, QueryTowerSettings, _parse, _targets, train_query_tower

TOPICS = ["volcanoes erupt hot lava", "pianos have black and white keys", "rivers flow into the sea",
          "bees make honey in hives", "trains run on steel rails", "stars shine in the night sky",
          "bread is baked in ovens", "glaciers carve deep valleys", "owls hunt mice at dusk", "kites fly in the wind"]
CODES = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet"]


@pytest.fixture(scope="module")
def base():
    from tessera.hub import load_encoder

    return load_encoder("default-encoder", device="cpu")


@pytest.fixture(scope="module")
def docs():
    return [Document(id=f"d{i}", text=f"{t}. More about how {t}.", title="") for i, t in enumerate(TOPICS)]


@pytest.fixture(scope="module")
def mapping():
    return np.random.default_rng(0).permutation(len(TOPICS))  # code word i -> document mapping[i]: nothing to infer


@pytest.fixture(scope="module")
def trained(base, docs, mapping):
    rows = [{"query": ["", f"code word {c}"], "pos": [["", docs[mapping[i]].full_text]]} for i, c in enumerate(CODES)]
    cands = Candidates.from_corpus(base, docs)
    model, stats = train_query_tower(base, rows, cands, QueryTowerSettings(epochs=12, batch_size=10, lr=2e-4))
    return model, stats, cands


def _mrr(model, cands, mapping):
    q = encode_queries(model, [f"code word {c}" for c in CODES])
    s = q @ cands.embeddings[: len(CODES)].T
    return float(np.mean([1 / (1 + (s[i] > s[i, mapping[i]]).sum()) for i in range(len(CODES))]))


def test_the_query_tower_learns_what_the_base_cannot(base, trained, mapping):
    model, stats, cands = trained
    before, after = _mrr(base, cands, mapping), _mrr(model, cands, mapping)
    assert before < 0.6 and after > 0.9, (before, after)
    assert stats["loss_last"] < stats["loss_first"] / 2
    assert stats["steps"] == 12 and stats["candidates"] == len(TOPICS)


def test_the_document_side_is_the_base_model(base, trained, docs):
    model, _, _ = trained
    texts = [d.full_text for d in docs[:3]]
    assert np.allclose(model.encode_document(texts), base.encode_document(texts), atol=1e-6)
    assert not np.allclose(model.encode_query(texts), base.encode_query(texts), atol=1e-3)


def test_saved_folder_loads_with_sentence_transformers(trained, tmp_path):
    from sentence_transformers import SentenceTransformer

    model, _, _ = trained
    model.save(str(tmp_path / "qt"))
    again = SentenceTransformer(str(tmp_path / "qt"), device="cpu")
    long = " ".join(TOPICS * 8)  # about 500 tokens: the 64-token query route and the 256-token document route differ
    for fn in ("encode_query", "encode_document"):
        for text in ("code word alpha", long):
            assert np.allclose(getattr(again, fn)([text]), getattr(model, fn)([text]), atol=1e-6)
    lengths = {name: mods[0].max_seq_length for name, mods in again[0].sub_modules.items()}
    assert lengths == {"query": 64, "document": 256}


def test_other_positives_and_the_source_document_leave_the_denominator():
    cands = Candidates(["A", "B", "C", "D"], np.zeros((4, 2), np.float32), {"a": 0, "b": 1, "c": 2, "d": 3})
    rows = [{"query": "q1", "pos": [["", "A"], ["", "B"]]},  # two positives: each masks the other
            {"query": "q2", "pos": ["C"], "source": {"doc_id": "d"}},  # a crop of d: d is not a negative
            {"query": "q3", "pos": ["A"], "doc_id": "a"}]  # written from its own positive: nothing to mask
    t = _targets(_parse(rows), cands)
    assert [(x.query, x.index, x.masked) for x in t] == [("q1", 0, (1,)), ("q1", 1, (0,)), ("q2", 2, (3,)), ("q3", 0, ())]


def test_copies_of_a_text_and_crops_of_one_document_are_not_negatives():
    cands = Candidates(["A", "B", "A", "D", "c1", "c2"], np.zeros((6, 2), np.float32), {"a": 0, "b": 1, "a2": 2, "d": 3})
    rows = [{"query": "q1", "pos": ["A"]},  # "A" is also candidate 2
            {"query": "q2", "pos": ["c1"], "source": {"doc_id": "d"}},  # two crops of d
            {"query": "q3", "pos": ["c2"], "source": {"doc_id": "d"}}]
    t = _targets(_parse(rows), cands)
    assert [(x.index, x.masked) for x in t] == [(0, (2,)), (4, (3, 5)), (5, (3, 4))]


def test_bad_rows_say_which(base, docs):
    cands = Candidates.from_corpus(base, docs[:2])
    with pytest.raises(InputError, match="no training rows"):
        train_query_tower(base, [], cands)
    for bad in ({"query": "q"}, {"query": "q", "pos": [["x"]]}, {"query": "q", "pos": ["x"], "neg": [1]}, "text"):
        with pytest.raises(InputError, match="row 2"):
            train_query_tower(base, [{"query": "q", "pos": ["x"]}, bad], cands)
    assert len(cands.texts) == 2, "nothing is encoded before every row parses"


def test_the_query_prompt_is_the_one_encode_query_uses(base):
    from tessera.retrieval.query_tower import _query_prompt

    class M:
        prompts, default_prompt_name = {"query": "Query: ", "document": ""}, None

    assert _query_prompt(M()) == "Query: "
    M.prompts, M.default_prompt_name = {"search": "Search: "}, "search"
    assert _query_prompt(M()) == "Search: "
    assert _query_prompt(base) in (None, "")


def test_recipe_query_only_keeps_the_document_side(base, docs, mapping, tmp_path):
    import json

    from sentence_transformers import SentenceTransformer

    from tessera.recipes.retrieval_train import Config, main

    rows = [{"query": ["", f"code word {c}"], "pos": [["", docs[mapping[i]].full_text]]} for i, c in enumerate(CODES)]
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))  # no negatives: query_only needs none
    dump = main(Config(data=str(data), backbone="default-encoder", dump_dir=str(tmp_path / "run"), query_only=True,
                       steps=3, batch_size=5, lr=1e-4))
    res = json.loads((dump / "results.json").read_text())
    assert res["query_only"] and res["steps"] == 3 and res["candidates"] == len(TOPICS)
    model = SentenceTransformer(res["model"], device="cpu")
    texts = [d.full_text for d in docs[:2]]
    assert np.allclose(model.encode_document(texts), base.encode_document(texts), atol=1e-5)
    assert not np.allclose(model.encode_query(["code word alpha"]), base.encode_query(["code word alpha"]), atol=1e-4)


def test_a_curriculum_ends_on_its_second_pass(base, docs, mapping):
    first = [{"query": ["", f"code word {c}"], "pos": [["", docs[mapping[i]].full_text]]} for i, c in enumerate(CODES)]
    shifted = np.roll(mapping, 1)
    second = [{"query": ["", f"code word {c}"], "pos": [["", docs[shifted[i]].full_text]]} for i, c in enumerate(CODES)]
    cands = Candidates.from_corpus(base, docs)
    model, stats = train_query_tower(base, first, cands, QueryTowerSettings(epochs=12, batch_size=10, lr=2e-4),
                                     then=second)
    assert [p["steps"] for p in stats["passes"]] == [12, 12] and stats["steps"] == 24
    assert _mrr(model, cands, shifted) > 0.9 and _mrr(model, cands, mapping) < 0.5
