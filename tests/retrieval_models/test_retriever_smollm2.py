"""Integration, on the embedded SmolLM2: prune it, train it as a retriever, save, load, rank."""

from __future__ import annotations

import numpy as np
import pytest

from retrieval_synthetic import ndcg_at_10


@pytest.mark.integration
def test_pruned_smollm2_retriever_trains_saves_loads_and_ranks(embedded_lm_dir, synthetic, tmp_path):
    from sentence_transformers import SentenceTransformer

    from tessera.retrieval import prune as P
    from tessera.retrieval import train as T
    from tessera.retrieval.encoder import build_retriever, check_bidirectional

    model, tok, report = P.prune("default", target_ratio=0.05, calibration="python-docs", n_samples=2, seq_len=64,
                                 eval_samples=1)
    assert abs(report.params_after["non_embedding"] / report.target - 1) < 0.05
    assert report.config_after["num_hidden_layers"] < 30
    ckpt = P.save_pruned(model, tok, tmp_path / "smol-p5", report)

    retriever = build_retriever(str(ckpt), max_seq_length=32, device="cpu")
    assert check_bidirectional(retriever)
    rows, test = synthetic
    ds, prompts = T.build_datasets(T.examples_from_rows(rows[:32], 1), "reasonir")
    stats = T.train_retriever(retriever, ds, prompts, T.make_loss(retriever), tmp_path / "scratch", steps=3,
                              batch_size=8, lr=1e-4, logging_steps=1, quiet=True)
    assert stats["steps"] == 3 and np.isfinite(stats["loss_last"])
    retriever.save(str(tmp_path / "retriever"))

    loaded = SentenceTransformer(str(tmp_path / "retriever"), device="cpu")
    docs = ["The mitochondria is the powerhouse of the cell.", "Paris is the capital of France.",
            "Python lists are mutable sequences."]
    q = loaded.encode_query(["Which city is the capital of France?"])
    d = loaded.encode_document(docs)
    np.testing.assert_allclose(q, retriever.encode_query(["Which city is the capital of France?"]), atol=1e-6)
    scores = (q @ d.T)[0]
    assert scores.shape == (3,) and np.all(np.isfinite(scores))
    assert 0.0 <= ndcg_at_10(loaded, test) <= 1.0
