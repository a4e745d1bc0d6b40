"""Readers (IR collections, QA sets, text, images), chunking and corpora."""

from tessera.data.chunking import Passage, chunk_documents, chunk_text, count_tokens_simple, split_sentences
from tessera.data.images import load_digits_8x8, read_mnist
from tessera.data.ir import (
    CRANFIELD_GAINS,
    read_beir,
    read_beir_qrels,
    read_bright,
    read_cranfield,
    read_scifact,
    read_trec,
    read_trec_docs,
    read_trec_qrels,
    read_trec_topics,
    read_vaswani,
)
from tessera.data.jsonl import append_jsonl, read_jsonl, read_jsonl_counted, write_jsonl_atomic
from tessera.data.paths import shared_data_dir
from tessera.data.qa import HotpotExample, MMLUQuestion, read_hotpotqa, read_mmlu
from tessera.data.text import load_corpus, load_corpus_counted, python_docs_corpus, read_wikitext
from tessera.data.types import Collection, Document, Query

__all__ = [
    "CRANFIELD_GAINS",
    "Collection",
    "Document",
    "HotpotExample",
    "MMLUQuestion",
    "Passage",
    "Query",
    "append_jsonl",
    "chunk_documents",
    "chunk_text",
    "count_tokens_simple",
    "load_corpus",
    "load_corpus_counted",
    "load_digits_8x8",
    "python_docs_corpus",
    "read_beir",
    "read_beir_qrels",
    "read_bright",
    "read_cranfield",
    "read_hotpotqa",
    "read_jsonl",
    "read_jsonl_counted",
    "read_mmlu",
    "read_mnist",
    "read_scifact",
    "read_trec",
    "read_trec_docs",
    "read_trec_qrels",
    "read_trec_topics",
    "read_vaswani",
    "read_wikitext",
    "shared_data_dir",
    "write_jsonl_atomic",
]
