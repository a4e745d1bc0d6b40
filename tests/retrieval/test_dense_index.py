"""DenseIndex (faiss) search, save/load; corpus encoding: order, resumption, rank slicing."""

from __future__ import annotations

import numpy as np
import pytest

from tessera.errors import EmptyCorpusError, InputError
from tessera.retrieval.dense_index import DenseIndex, encode_corpus, rank_shards, shard_plan


def unit_rows(n: int, d: int = 16, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


# ------------------------------------------------------------------ index


def test_flat_search_is_exact_inner_product():
    docs, queries = unit_rows(50), unit_rows(4, seed=1)
    ids = [f"d{i}" for i in range(50)]
    index = DenseIndex.build(docs, ids, encoder="some-encoder")
    assert index.kind == "flat" and len(index) == 50 and index.dim == 16
    assert index.encoder == {"spec": "some-encoder", "dim": 16}
    res = index.search(queries, 5)
    scores = queries @ docs.T
    for qi, hits in enumerate(res):
        want = np.argsort(-scores[qi])[:5]
        assert [h[0] for h in hits] == [ids[i] for i in want]
        assert [h[1] for h in hits] == pytest.approx(scores[qi, want].tolist(), abs=1e-5)
    assert len(index.search(queries[0], 500)[0]) == 50  # k capped at the corpus size; 1-d query accepted


def test_save_load_roundtrip_and_atomic_replace(tmp_path):
    docs = unit_rows(30)
    index = DenseIndex.build(docs, [f"doc-{i}" for i in range(30)], encoder={"spec": "default-encoder", "name": "x"})
    folder = tmp_path / "dense"
    index.save(folder)
    again = DenseIndex.load(folder)
    assert again.doc_ids == index.doc_ids and again.encoder == index.encoder and again.kind == "flat"
    q = unit_rows(3, seed=2)
    assert again.search(q, 7) == index.search(q, 7)
    # saving over an existing index replaces it whole and leaves no temporary folders
    DenseIndex.build(docs[:5], [f"n{i}" for i in range(5)]).save(folder)
    assert len(DenseIndex.load(folder)) == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dense"]


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_approximate_kinds_find_the_vector_itself(tmp_path, kind):
    docs = unit_rows(2000, d=32)
    index = DenseIndex.build(docs, [str(i) for i in range(2000)], kind=kind)
    assert index.kind == kind and index.params
    hits = index.search(docs[:20], 3)
    assert sum(h[0][0] == str(i) for i, h in enumerate(hits)) >= 19
    index.save(tmp_path / kind)
    again = DenseIndex.load(tmp_path / kind)
    assert again.kind == kind and again.params == index.params
    assert again.search(docs[:5], 3) == index.search(docs[:5], 3)


def test_index_errors(tmp_path):
    with pytest.raises(InputError, match="duplicate"):
        DenseIndex.build(unit_rows(3), ["a", "b", "a"])
    with pytest.raises(InputError):
        DenseIndex.build(unit_rows(3), ["a", "b"])
    with pytest.raises(EmptyCorpusError):
        DenseIndex.build(np.zeros((0, 4), np.float32), [])
    with pytest.raises(InputError, match="kind"):
        DenseIndex.build(unit_rows(3), ["a", "b", "c"], kind="lsh")
    index = DenseIndex.build(unit_rows(3), ["a", "b", "c"])
    with pytest.raises(InputError, match="dimension"):
        index.search(unit_rows(1, d=8), 2)
    with pytest.raises(InputError, match="not a dense index"):
        DenseIndex.load(tmp_path)


# --------------------------------------------------------------- encoding


class FakeEncoder:
    """Stands in for a SentenceTransformer: deterministic embeddings, counts batches, can fail on cue."""

    tokenizer = None  # -> encode_corpus sorts by character length
    max_seq_length = 64

    def __init__(self, fail_after: int | None = None):
        self.calls: list[list[str]] = []
        self.fail_after = fail_after

    def parameters(self):
        return iter(())

    def __repr__(self) -> str:  # part of the shard fingerprint, like a real model's architecture
        return "FakeEncoder()"

    def encode_document(self, texts, batch_size=32, normalize_embeddings=False, **kwargs):
        if self.fail_after is not None and len(self.calls) >= self.fail_after:
            raise KeyboardInterrupt
        self.calls.append(list(texts))
        out = np.array([[len(t), sum(map(ord, t)) % 97, 1.0] for t in texts], dtype=np.float32)
        if normalize_embeddings:
            out /= np.linalg.norm(out, axis=1, keepdims=True)
        return out


TEXTS = [("word " * (i % 7 + 1)) + f"doc{i}" for i in range(20)]


def test_batches_are_length_sorted_and_output_keeps_input_order():
    enc = FakeEncoder()
    out = encode_corpus(enc, TEXTS, batch_size=4)
    assert out.shape == (20, 3)
    np.testing.assert_allclose(out, FakeEncoder().encode_document(TEXTS, normalize_embeddings=True), rtol=1e-6)
    lengths = [[len(t) for t in batch] for batch in enc.calls]
    flat = [n for b in lengths for n in b]
    assert flat == sorted(flat, reverse=True)  # longest first, batch after batch
    assert all(len(b) <= 4 for b in enc.calls) and len(enc.calls) == 5


def test_shard_plan_and_rank_slices():
    order, shards = shard_plan(np.array([1, 5, 3, 5, 2]), 2)
    assert order.tolist() == [1, 3, 2, 4, 0]  # longest first, stable among equals
    assert shards == [(0, 2), (2, 4), (4, 5)]
    assert rank_shards(5, 0, 2) == [0, 2, 4] and rank_shards(5, 1, 2) == [1, 3] and rank_shards(2, 2, 3) == []


def test_interrupted_encoding_resumes_from_finished_shards(tmp_path):
    work = tmp_path / "work"
    full = encode_corpus(FakeEncoder(), TEXTS, batch_size=2)  # 10 batches, in memory
    broken = FakeEncoder(fail_after=5)  # dies in the 6th batch = in the 3rd shard of 2 batches
    with pytest.raises(KeyboardInterrupt):
        encode_corpus(broken, TEXTS, batch_size=2, shard_size=4, work_dir=work)
    [sub] = list(work.iterdir())
    assert sorted(p.name for p in sub.glob("shard-*.npy")) == ["shard-00000.npy", "shard-00001.npy"]
    assert not list(sub.glob(".*tmp"))  # no half-written shard
    again = FakeEncoder()
    out = encode_corpus(again, TEXTS, batch_size=2, shard_size=4, work_dir=work)
    assert len(again.calls) == 6  # shards 2..4 only (3 shards x 2 batches)
    np.testing.assert_allclose(out, full)
    assert not work.exists()  # cleaned up after the merge


def test_changed_texts_do_not_reuse_old_shards(tmp_path):
    work = tmp_path / "work"
    encode_corpus(FakeEncoder(), TEXTS, batch_size=2, shard_size=4, work_dir=work, cleanup=False)
    enc = FakeEncoder()
    changed = [t + "!" for t in TEXTS]
    out = encode_corpus(enc, changed, batch_size=2, shard_size=4, work_dir=work, cleanup=False)
    assert len(enc.calls) == 10
    np.testing.assert_allclose(out, encode_corpus(FakeEncoder(), changed, batch_size=2))
    assert len(list(work.iterdir())) == 2


def test_rank_slicing_with_env_vars(tmp_path, monkeypatch):
    work = tmp_path / "shared-work"
    full = encode_corpus(FakeEncoder(), TEXTS, batch_size=2)
    # rank 1 of 2 (as torchrun would set it): encodes shards 1 and 3 of 5, returns nothing
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    r1 = FakeEncoder()
    assert encode_corpus(r1, TEXTS, batch_size=2, shard_size=4, work_dir=work) is None
    assert len(r1.calls) == 4
    [sub] = list(work.iterdir())
    assert sorted(p.name for p in sub.glob("shard-*.npy")) == ["shard-00001.npy", "shard-00003.npy"]
    # rank 0: its own shards 0, 2, 4, then merges everything
    monkeypatch.setenv("RANK", "0")
    r0 = FakeEncoder()
    out = encode_corpus(r0, TEXTS, batch_size=2, shard_size=4, work_dir=work)
    assert len(r0.calls) == 6
    np.testing.assert_allclose(out, full)
    assert set(map(tuple, r0.calls)).isdisjoint(map(tuple, r1.calls))


def test_rank0_fills_shards_other_ranks_did_not_write(tmp_path):
    enc = FakeEncoder()
    out = encode_corpus(enc, TEXTS, batch_size=2, shard_size=4, work_dir=tmp_path / "w", rank=0, world_size=3)
    assert len(enc.calls) == 10
    np.testing.assert_allclose(out, encode_corpus(FakeEncoder(), TEXTS, batch_size=2))


def test_encoding_errors():
    with pytest.raises(InputError, match="work_dir"):
        encode_corpus(FakeEncoder(), TEXTS, rank=0, world_size=2)
    with pytest.raises(InputError, match="rank"):
        encode_corpus(FakeEncoder(), TEXTS, rank=2, world_size=2, work_dir="unused")
    with pytest.raises(EmptyCorpusError):
        encode_corpus(FakeEncoder(), [])


@pytest.mark.integration
def test_minilm_matches_plain_sentence_transformers():
    from tessera.hub import load_encoder

    model = load_encoder("default-encoder", device="cpu")
    texts = ["short", "a somewhat longer sentence about aerodynamics and boundary layers",
             "Gravitational waves were detected by LIGO in 2015.", "x " * 40, "Mixed CASE and digits 12345"] * 3
    out = encode_corpus(model, texts, batch_size=4)
    ref = model.encode(texts, batch_size=4, normalize_embeddings=True)
    np.testing.assert_allclose(out, ref, atol=2e-5)
    assert np.allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
