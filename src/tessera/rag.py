"""RAG evaluation: multiple-choice accuracy closed-book vs. with retrieved passages (ReasonIR's RAG setting).

ReasonIR (PAPERS.md) measures whether better retrieval helps a reader: MMLU questions
answered by an LM closed-book and with the retriever's top-k passages from a
datastore prepended.  Here any corpus (``wikitext2``, ``python-docs``, a file/folder)
and any retriever (BM25, dense, hybrid with any encoder) can be the datastore, any
backend the reader; the answer is the option letter with the highest next-token
log-likelihood after ``Answer:`` (no free generation, so no parsing).

``tessera rag eval`` writes ``predictions.jsonl`` (appended as it goes, so an
interrupted run resumes) and ``metrics.json`` (accuracy per mode, per subject).
"""

from __future__ import annotations

import json
import random
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path

import typer

from tessera import ui
from tessera.data.qa import MMLUQuestion
from tessera.errors import InputError

LETTERS = ("A", "B", "C", "D")
MODES = ("closed", "rag")
MMLU_INSTRUCTION = "Answer with the letter (A, B, C or D) of the correct option."

rag_app = typer.Typer(help="Retrieval-augmented generation: evaluate a reader with and without retrieved passages.",
                      no_args_is_help=True)


def mmlu_messages(q: MMLUQuestion, passages: Sequence[str] = ()) -> list[dict]:
    """One user turn: numbered passages (if any), the question, the lettered options, the instruction."""
    parts = []
    if passages:
        parts.append("Context:\n" + "\n".join(f"[{i}] {p}" for i, p in enumerate(passages, 1)))
    parts.append(f"Question: {q.question}\n" + "\n".join(f"{l}. {c}" for l, c in zip(LETTERS, q.choices)))
    parts.append(MMLU_INSTRUCTION)
    return [{"role": "user", "content": "\n\n".join(parts)}]


def answer_letters(backend, questions: Sequence[MMLUQuestion], contexts: Sequence[Sequence[str]] | None = None) -> list[dict]:
    """``[{"pred": letter, "logprobs": {letter: lp}}]``: the option letter most likely after ``Answer:``."""
    contexts = contexts or [()] * len(questions)
    lps = backend.next_token_logprobs([mmlu_messages(q, c) for q, c in zip(questions, contexts)], LETTERS, prefix="Answer:")
    return [{"pred": max(LETTERS, key=lambda l: lp[l]), "logprobs": {l: round(lp[l], 4) for l in LETTERS}} for lp in lps]  # noqa: E741


def retrieval_query(q: MMLUQuestion) -> str:
    return q.question + "\n" + " ".join(q.choices)


def open_datastore(spec: str):
    """``wikitext2`` (WikiText-2 test articles from the shared data), ``wikitext:PATH``, ``python-docs`` or a
    file/folder of documents -> a :class:`~tessera.retrieval.corpus_index.CorpusIndex` (chunked, cached)."""
    from tessera.data.paths import shared_data_dir
    from tessera.data.text import read_wikitext
    from tessera.retrieval.corpus_index import CorpusIndex

    if spec == "wikitext2" or spec.startswith("wikitext:"):
        if spec == "wikitext2":
            root = shared_data_dir()
            path = root / "wikitext2" / "test.txt" if root else None
            if path is None or not path.is_file():
                raise InputError("WikiText-2 not found under ../shared/data/wikitext2/test.txt; pass --corpus wikitext:PATH")
        else:
            path = Path(spec.split(":", 1)[1])
        return CorpusIndex.from_documents(read_wikitext(path), name="wikitext2" if spec == "wikitext2" else "wikitext")
    return CorpusIndex.open(spec)


def retrieve_passages(index, questions: Sequence[MMLUQuestion], k: int, retriever: str = "bm25",
                      encoder: str = "default-encoder", max_passage_words: int = 120) -> list[list[str]]:
    from tessera.retrieval.corpus_index import passage_text
    from tessera.retrieval.synth import truncate_words

    return [[truncate_words(passage_text(h.passage), max_passage_words) for h in index.search(retrieval_query(q), k, retriever, encoder)]
            for q in questions]


def accuracy(rows: Sequence[dict]) -> dict:
    n = len(rows)
    by_subject: dict[str, list[bool]] = defaultdict(list)
    for r in rows:
        by_subject[r["subject"]].append(r["pred"] == r["answer"])
    return {"accuracy": round(sum(r["pred"] == r["answer"] for r in rows) / n, 4) if n else 0.0, "n": n,
            "pred_distribution": dict(Counter(r["pred"] for r in rows)),
            "per_subject": {s: round(sum(v) / len(v), 4) for s, v in sorted(by_subject.items())}}


def rag_eval(questions: Sequence[MMLUQuestion], backend, index=None, k: int = 3, retriever: str = "bm25",
             encoder: str = "default-encoder", modes: Sequence[str] = MODES, max_passage_words: int = 120,
             batch: int = 32, predictions: Path | None = None) -> dict:
    """Accuracy per mode (``closed``: the question alone; ``rag``: top-``k`` passages prepended).

    With ``predictions`` (a JSONL path), rows are appended per batch and rows already there are reused."""
    from tessera.data.jsonl import append_jsonl, read_jsonl

    if "rag" in modes and index is None:
        raise InputError("rag mode needs a corpus; pass --corpus")
    done = {}
    if predictions is not None and predictions.is_file():
        done = {(r["id"], r["mode"]): r for r in read_jsonl(predictions, skip_bad=True) if "id" in r and "mode" in r}
    results, timings = {}, {}
    for mode in modes:
        todo = [q for q in questions if (q.id, mode) not in done]
        t = time.perf_counter()
        for s in range(0, len(todo), batch):
            qs = todo[s:s + batch]
            ctx = retrieve_passages(index, qs, k, retriever, encoder, max_passage_words) if mode == "rag" else None
            for i, (q, a) in enumerate(zip(qs, answer_letters(backend, qs, ctx))):
                row = {"id": q.id, "mode": mode, "subject": q.subject, "answer": q.answer, **a}
                if ctx is not None:
                    row["passages"] = [p[:200] for p in ctx[i]]
                done[(q.id, mode)] = row
                if predictions is not None:
                    append_jsonl(predictions, row)
        timings[mode] = round(time.perf_counter() - t, 2)
        results[mode] = accuracy([done[(q.id, mode)] for q in questions])
    out = {"modes": results, "seconds": timings, "n_questions": len(questions)}
    if "closed" in results and "rag" in results:
        out["rag_minus_closed"] = round(results["rag"]["accuracy"] - results["closed"]["accuracy"], 4)
    return out


def sample_questions(questions: list[MMLUQuestion], limit: int | None, seed: int) -> list[MMLUQuestion]:
    if limit is None or limit <= 0 or limit >= len(questions):
        return questions
    return random.Random(seed).sample(questions, limit)


@rag_app.command("eval")
def eval_cmd(
    out: Path = typer.Option(..., "--out", "-o", help="Folder for predictions.jsonl and metrics.json (resumes if they exist)."),
    mmlu: Path = typer.Option(None, "--mmlu", help="MMLU folder holding {split}/*_{split}.csv (default ../shared/data/mmlu)."),
    split: str = typer.Option("val", "--split", help="MMLU split: dev | val | test."),
    corpus: str = typer.Option("wikitext2", "--corpus", "-c", help="Datastore: wikitext2, wikitext:PATH, python-docs, or a file/folder of documents."),
    retriever: str = typer.Option("bm25", "--retriever", "-r", help="bm25 | dense | hybrid."),
    encoder: str = typer.Option("default-encoder", "--encoder", "-e", help="Encoder for dense/hybrid."),
    k: int = typer.Option(3, "--k", "-k", help="Passages prepended in rag mode."),
    mode: str = typer.Option("both", "--mode", help="both | closed | rag."),
    limit: int = typer.Option(0, "--limit", help="Evaluate a seeded random sample of this many questions (0 = all)."),
    seed: int = typer.Option(0, "--seed"),
    lm: str = typer.Option("default", "--lm", help="Reader: 'default' (embedded SmolLM2), a folder, or the model name served at --lm-url."),
    lm_url: str = typer.Option(None, "--lm-url", help="OpenAI-compatible server (vLLM, llama.cpp) base URL, e.g. http://127.0.0.1:8000/v1."),
    batch_size: int = typer.Option(8, "--batch-size", help="Local LM batch size."),
    max_passage_words: int = typer.Option(120, "--max-passage-words", help="Each passage is cut to this many words."),
):
    """MMLU accuracy closed-book vs. with top-k retrieved passages (answer = most likely option letter)."""
    from tessera.config import atomic_write_text
    from tessera.data.paths import shared_data_dir
    from tessera.data.qa import read_mmlu
    from tessera.lm import load_backend
    from tessera.retrieval.corpus_index import RETRIEVERS

    if mode not in ("both", *MODES):
        raise InputError(f"unknown --mode {mode!r}; use both, closed or rag")
    if retriever not in RETRIEVERS:
        raise InputError(f"unknown retriever {retriever!r}; use one of {', '.join(RETRIEVERS)}")
    if k < 1:
        raise InputError(f"--k must be at least 1, got {k}")
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file; pass a folder")
    if mmlu is None:
        root = shared_data_dir()
        if root is None or not (root / "mmlu").is_dir():
            raise InputError("MMLU not found under ../shared/data/mmlu; pass --mmlu FOLDER")
        mmlu = root / "mmlu"
    questions = sample_questions(read_mmlu(mmlu, split=split), limit, seed)
    modes = MODES if mode == "both" else (mode,)
    index = open_datastore(corpus) if "rag" in modes else None
    with ui.status(f"loading {lm}"):
        backend = load_backend(lm, url=lm_url, batch_size=batch_size)
    out.mkdir(parents=True, exist_ok=True)
    res = rag_eval(questions, backend, index, k=k, retriever=retriever, encoder=encoder, modes=modes,
                   max_passage_words=max_passage_words, predictions=out / "predictions.jsonl")
    doc = {"mmlu": str(mmlu), "split": split, "limit": limit, "seed": seed, "corpus": corpus if index else None,
           "retriever": retriever if index else None, "encoder": encoder if index and retriever != "bm25" else None,
           "k": k if index else None, "lm": lm, "lm_url": lm_url, "answer_by": "log-likelihood of the option letter after 'Answer:'",
           **res, "backend": backend.stats.to_dict()}
    atomic_write_text(out / "metrics.json", json.dumps(doc, indent=2))
    line = "  ".join(f"{m}: {r['accuracy']:.4f}" for m, r in res["modes"].items())
    ui.out.print(f"MMLU {split} ({len(questions)} questions) {line}" + (f"  (rag - closed {res['rag_minus_closed']:+.4f})" if "rag_minus_closed" in res else ""))
    ui.out.print(f"wrote {out / 'metrics.json'}")
