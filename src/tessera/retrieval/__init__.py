"""Retrieval: BM25 (bm25s), dense encoders and indexes, training, pruning, metrics."""
