"""ReasonIR's synthetic training data: reasoning-intensive queries per document, with hard negatives.

ReasonIR (PAPERS.md) trains its retriever on data generated *from documents*: for
each seed document an LLM writes a query for which the document is useful
evidence, and a hard negative is attached.  The stages, as in its pipeline:

- **seed documents** (:func:`seed_documents`): exact duplicates removed (whitespace
  and case normalised), documents outside a word-length range dropped, and an
  optional quality filter hook ``quality_filter(doc) -> bool``;
- **HQ** (hard queries, :func:`hq_messages`): the generator first names the domain,
  the key concepts and the reasoning patterns the document supports, then writes a
  self-contained, scenario-style question that needs analysis rather than fact
  recall and for which the document is useful without being mentioned;
- **VL** (varied-length queries, :func:`vl_messages`): a query of a target length
  drawn per document from a range; ReasonIR uses about 300-2000 words, here the
  range is scaled to the generator's budget (:func:`vl_word_range`);
- **hard negatives** (:func:`bm25_hard_negative`): BM25 over the same corpus, the
  first document at rank >= 20 that is not the positive (ReasonIR's code), and
  optionally an LLM-written document that overlaps the query on the surface but
  does not help answer it (:func:`negative_messages`).

Output rows are the training format of :mod:`tessera.retrieval.train`
(``{"query": [instruction, text], "pos": [[instruction, text]], "neg": [...]}``) plus
``id`` (``<doc id>/<stage>``), ``doc_id``, ``stage`` and ``meta`` (domain, concepts,
reasoning patterns, how the reply was parsed, attempts, negative rank).

The job is resumable (rows are appended as they are finished and ids already in the
output, or in its ``.failures.jsonl``, are skipped), shardable (``shard=(i, n)`` takes
every n-th document) and seeded (the document sample, VL target lengths and
retry sampling all follow ``seed``).  Replies that never give a usable query after
3 attempts are written to ``<out>.failures.jsonl`` with their raw text; the run goes
on.  :func:`synth_stats` writes ``<out>.stats.json`` (counts, lengths, parse methods,
failures, generation speed).

Scaled down for CPU (defaults here, the paper's values in the docstrings): document
text in prompts is cut to ``max_doc_words`` (150) words; VL lengths run from 40 to at
most ``0.7 * max_new_tokens`` words instead of 300-2000.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import statistics
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from tessera.data.types import Document
from tessera.errors import EmptyCorpusError, InputError
from tessera.retrieval.encoder import DEFAULT_INSTRUCTION
from tessera.retrieval.train import REASONIR_MIN_NEG_RANK

STAGES = ("hq", "vl")
HQ_KEYS = ("domain", "key_concepts", "reasoning_patterns", "query")

# A worked example shown to the generator before each document (written for tessera, not from any data set).
EXAMPLE_DOC = ("Vitamin D and fractures in older adults\n"
               "In a trial of 2,000 adults over 70, daily high-dose vitamin D did not reduce fractures compared with "
               "placebo, although blood vitamin D levels rose. Falls were slightly more frequent with the high dose.")
EXAMPLE_HQ = {
    "domain": "clinical nutrition and geriatrics",
    "key_concepts": ["vitamin D supplementation", "fracture risk", "surrogate biomarkers versus clinical outcomes"],
    "reasoning_patterns": ["distinguishing a surrogate marker from a clinical outcome", "weighing benefit against harm"],
    "query": ("My 78-year-old mother's doctor raised her vitamin D dose because her blood level was low, hoping to prevent "
              "another hip fracture. If her level goes up, should we expect fewer fractures, or could the higher dose "
              "even make falls more likely?"),
}
EXAMPLE_VL = ("I look after my father, who is 81 and broke his wrist last winter. His blood tests showed low vitamin D, so "
              "his doctor prescribed a large daily dose. We assumed that raising the level would protect his bones, but a "
              "friend said big doses might not prevent fractures at all and could make him unsteady. He already uses a "
              "cane and has fallen twice. How should we think about whether the higher dose helps him?")
EXAMPLE_NEG = ("Vitamin D is a fat-soluble vitamin produced in the skin under sunlight and found in oily fish and fortified "
               "milk. Its history began with the discovery that cod liver oil cured rickets in children in the 1920s.")

HQ_INSTRUCTION = (
    "Write a hard search query for the document below. First name the domain, the key concepts and the reasoning "
    "patterns the document supports. Then write the query: a self-contained, realistic scenario question that needs "
    "analysis rather than fact recall, for which the document is useful evidence. Do not mention the document. "
    "Reply with one JSON object with the keys domain, key_concepts, reasoning_patterns, query.")
VL_INSTRUCTION = (
    "Write a search query of the given length for the document below: a detailed, information-rich description of "
    "a realistic situation or problem from someone who needs help, for which the document is useful evidence. Do not "
    "mention the document. Reply with one JSON object with the key query.")
NEG_INSTRUCTION = (
    "Here is a search query. Write a short passage (about 60 words) on the same topic that uses the query's key words "
    "but does NOT contain any information that would help answer it. Reply with one JSON object with the key passage.")
MENTIONS = re.compile(r"\b(th(e|is)\s+(document|abstract|passage|article|text))\b", re.I)


def truncate_words(text: str, n: int) -> str:
    words = text.split()
    return text if len(words) <= n else " ".join(words[:n]) + " ..."


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


# ----------------------------------------------------------------------------------- seed documents


def seed_documents(docs: Sequence[Document], min_words: int = 30, max_words: int = 5000,
                   quality_filter: Callable[[Document], bool] | None = None) -> tuple[list[Document], dict]:
    """ReasonIR's seed-document stage: drop exact duplicates (normalised text), documents outside
    ``[min_words, max_words]`` words and those ``quality_filter`` rejects.  Returns ``(kept, counts)``."""
    seen: set[str] = set()
    kept, counts = [], {"input": len(docs), "duplicates": 0, "too_short": 0, "too_long": 0, "quality": 0}
    for d in docs:
        key = hashlib.sha1(_norm(d.full_text).encode()).hexdigest()
        if key in seen:
            counts["duplicates"] += 1
            continue
        seen.add(key)
        n = len(d.full_text.split())
        if n < min_words:
            counts["too_short"] += 1
        elif n > max_words:
            counts["too_long"] += 1
        elif quality_filter is not None and not quality_filter(d):
            counts["quality"] += 1
        else:
            kept.append(d)
    counts["kept"] = len(kept)
    return kept, counts


def parse_shard(shard: str | tuple[int, int] | None) -> tuple[int, int]:
    """``"i/n"`` -> ``(i, n)`` with ``0 <= i < n``."""
    if shard is None or shard == "":
        return 0, 1
    if isinstance(shard, tuple):
        i, n = shard
    else:
        m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(shard))
        if not m:
            raise InputError(f"--shard {shard!r} is not i/n; pass e.g. 0/4 (the first of four shards)")
        i, n = int(m.group(1)), int(m.group(2))
    if n < 1 or not 0 <= i < n:
        raise InputError(f"--shard {i}/{n} is out of range; i runs from 0 to n-1")
    return i, n


def select_documents(docs: Sequence[Document], limit: int | None = None, shard=(0, 1), seed: int = 0) -> list[Document]:
    """A seeded sample of ``limit`` documents (all when ``None``), then every n-th for shard ``(i, n)``.

    The sample depends only on ``seed`` and the documents, so every shard sees the same sample."""
    docs = list(docs)
    if limit is not None and limit < len(docs):
        docs = random.Random(seed).sample(docs, int(limit))
    i, n = shard
    return docs[i::n]


# ------------------------------------------------------------------------------------------ prompts


def _one_shot(instruction: str, example_user: str, example_reply: dict, user: str) -> list[dict]:
    """System instruction, one worked example (user -> JSON reply), then the real request."""
    return [{"role": "system", "content": instruction},
            {"role": "user", "content": example_user},
            {"role": "assistant", "content": json.dumps(example_reply)},
            {"role": "user", "content": user}]


def hq_messages(doc: Document, max_doc_words: int = 150) -> list[dict]:
    """HQ prompt: the instruction, one worked example (document -> domain, concepts, reasoning patterns, query),
    then the document (cut to ``max_doc_words``)."""
    return _one_shot(HQ_INSTRUCTION, f"Document:\n{EXAMPLE_DOC}", EXAMPLE_HQ,
                     f"Document:\n{truncate_words(doc.full_text, max_doc_words)}")


def vl_messages(doc: Document, words: int, max_doc_words: int = 150) -> list[dict]:
    """VL prompt: a query of about ``words`` words (one worked example first)."""
    ex_words = len(EXAMPLE_VL.split())
    return _one_shot(VL_INSTRUCTION, f"Length: about {ex_words} words.\nDocument:\n{EXAMPLE_DOC}", {"query": EXAMPLE_VL},
                     f"Length: about {words} words.\nDocument:\n{truncate_words(doc.full_text, max_doc_words)}")


def negative_messages(query: str) -> list[dict]:
    """LLM hard negative prompt: same surface (topic, key words), no help in answering."""
    return _one_shot(NEG_INSTRUCTION, f"Query: {EXAMPLE_HQ['query']}", {"passage": EXAMPLE_NEG}, f"Query: {query}")


def vl_word_range(max_new_tokens: int, paper: tuple[int, int] = (300, 2000), min_words: int = 40) -> tuple[int, int]:
    """ReasonIR's VL lengths (about 300-2000 words) capped by what the generator may write
    (0.7 words per new token), and at least ``min_words``."""
    cap = max(min_words, int(0.7 * max_new_tokens))
    return (paper[0] if cap >= paper[0] else min_words), min(paper[1], cap)


def vl_target_words(doc_id: str, seed: int, word_range: tuple[int, int]) -> int:
    """The VL target length for one document: uniform in ``word_range``, seeded by ``(seed, doc_id)``."""
    return random.Random(f"{seed}:{doc_id}:vl").randint(*word_range)


# -------------------------------------------------------------------------------------- validation


def _overlap(a: str, b: str) -> float:
    wa, wb = set(_norm(a).split()), set(_norm(b).split())
    return len(wa & wb) / max(1, len(wa | wb))


def check_query(query, min_words: int = 6) -> str | None:
    """Why a generated query is unusable, or ``None``: too short, a copy of the worked example, naming the document."""
    if not isinstance(query, str) or len(query.split()) < min_words:
        return f"query has fewer than {min_words} words"
    if _overlap(query, EXAMPLE_HQ["query"]) > 0.5 or _overlap(query, EXAMPLE_VL) > 0.5:
        return "query copies the worked example"
    if MENTIONS.search(query):
        return "query mentions the document"
    return None


def _listify(v) -> list[str]:
    if isinstance(v, list):
        return [str(x) for x in v if str(x).strip()]
    return [str(v)] if isinstance(v, str) and v.strip() else []


# ----------------------------------------------------------------------------------- hard negatives


def bm25_hard_negative(hits: Sequence[tuple[int, float]], positive: int, texts: Sequence[str],
                       min_rank: int = REASONIR_MIN_NEG_RANK, rng: random.Random | None = None) -> tuple[int, int | None, str]:
    """ReasonIR's BM25 hard negative: the first hit at 1-based rank >= ``min_rank`` that is not the positive.

    ``hits`` are BM25's ``[(row, score)]`` best first; a document whose text equals the
    positive's (a duplicate under another id) counts as the positive.  If BM25 ranks
    fewer documents, the lowest-ranked non-positive hit is used (``"low_rank"``), else a
    random non-positive document (``"random"``).  Returns ``(row, rank or None, source)``.
    """
    pos_text = _norm(texts[positive])

    def is_pos(i: int) -> bool:
        return i == positive or _norm(texts[i]) == pos_text

    ranked = [(r + 1, i) for r, (i, _) in enumerate(hits)]
    for r, i in ranked:
        if r >= min_rank and not is_pos(i):
            return i, r, "bm25"
    for r, i in reversed(ranked):
        if not is_pos(i):
            return i, r, "low_rank"
    rng = rng or random.Random(0)
    candidates = [i for i in range(len(texts)) if not is_pos(i)]
    if not candidates:
        raise EmptyCorpusError("every document in the corpus is the positive; a hard negative needs a second document")
    return rng.choice(candidates), None, "random"


# ------------------------------------------------------------------------------------------ the job


@dataclass
class SynthConfig:
    stages: tuple[str, ...] = ("hq",)
    instruction: str = DEFAULT_INSTRUCTION  # ReasonIR: "Given a {task} post, retrieve relevant passages that help answer the post"
    max_doc_words: int = 150  # document words shown to the generator (CPU scale-down; ReasonIR shows whole documents)
    hq_max_new_tokens: int = 160
    vl_max_new_tokens: int = 256  # VL lengths are scaled to this (vl_word_range)
    min_query_words: int = 6
    min_neg_rank: int = REASONIR_MIN_NEG_RANK  # ReasonIR: first non-positive at rank >= 20
    bm25_depth: int = 100
    llm_negative: bool = False
    neg_max_new_tokens: int = 120
    retries: int = 3
    chunk_size: int = 16  # documents per resumable chunk
    seed: int = 0
    # round-trip consistency filter (Promptagator, InPars): keep a query only when BM25 ranks its source
    # document in the top ``filter_top_k`` of the corpus; 0 = keep every query
    filter_top_k: int = 0


def failures_path(out: Path) -> Path:
    return out.with_name(out.name + ".failures.jsonl") if out.suffix != ".jsonl" else out.with_suffix(".failures.jsonl")


def rejected_path(out: Path) -> Path:
    """Queries the round-trip filter dropped (with the source document's BM25 rank), one JSON row each."""
    return out.with_name(out.name + ".rejected.jsonl") if out.suffix != ".jsonl" else out.with_suffix(".rejected.jsonl")


def stats_path(out: Path) -> Path:
    return out.with_name(out.name + ".stats.json") if out.suffix != ".jsonl" else out.with_suffix(".stats.json")


def finished_ids(out: Path, include_failures: bool = True) -> set[str]:
    """Ids already in ``out`` (and in its rejected and failures files): a resumed run skips them.

    These are files this command wrote, so a line a crash left unfinished (invalid JSON, or a
    UTF-8 character cut in two) is skipped, not an error: that row is generated again."""
    ids: set[str] = set()
    paths = [Path(out), rejected_path(out)] + ([failures_path(out)] if include_failures else [])
    for p in paths:
        if not p.is_file():
            continue
        for raw in p.read_bytes().splitlines():
            try:
                row = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, ValueError, RecursionError):
                continue
            if isinstance(row, dict) and isinstance(row.get("id"), (str, int)):
                ids.add(str(row["id"]))
    return ids


def _hq_job(backend, docs: list[Document], cfg: SynthConfig, seed: int):
    from tessera.lm.jsonx import generate_json

    def validate(obj):
        return check_query(obj.get("query"), cfg.min_query_words)

    convs = [hq_messages(d, cfg.max_doc_words) for d in docs]
    res = generate_json(backend, convs, keys=HQ_KEYS, validate=validate, retries=cfg.retries,
                        max_new_tokens=cfg.hq_max_new_tokens, prefix='{"domain": "', seed=seed)
    out = []
    for d, r in zip(docs, res):
        value, method = r.value, r.method
        if value is None:  # fallback: any attempt whose query field alone is usable (recorded as such)
            from tessera.lm.jsonx import extract_fields

            for raw in r.raw:
                q = extract_fields(raw, ("query",)).get("query")
                if q is not None and check_query(q, cfg.min_query_words) is None:
                    value, method = {**extract_fields(raw, HQ_KEYS), "query": q}, "fallback_query_only"
                    break
        out.append((d, value, method, r, {}))
    return out


def _vl_job(backend, docs: list[Document], cfg: SynthConfig, seed: int):
    from tessera.lm.jsonx import generate_json

    lo_hi = vl_word_range(cfg.vl_max_new_tokens)
    targets = [vl_target_words(d.id, cfg.seed, lo_hi) for d in docs]
    by_len: dict[int, list[int]] = {}
    for j, w in enumerate(targets):  # similar targets share a generation call (max_new_tokens per target)
        by_len.setdefault(min(cfg.vl_max_new_tokens, int(w / 0.7) + 16), []).append(j)
    results: list = [None] * len(docs)
    for budget, idx in sorted(by_len.items()):
        convs = [vl_messages(docs[j], targets[j], cfg.max_doc_words) for j in idx]
        res = generate_json(backend, convs, keys=("query",),
                            validate=lambda o: check_query(o.get("query"), cfg.min_query_words),
                            retries=cfg.retries, max_new_tokens=budget, prefix='{"query": "', seed=seed)
        for j, r in zip(idx, res):
            results[j] = r
    return [(d, r.value, r.method, r, {"target_words": w, "word_range": list(lo_hi)}) for d, r, w in zip(docs, results, targets)]


def _check_synth_inputs(docs: Sequence[Document], out: str | Path, cfg: SynthConfig | None,
                        corpus: Sequence[Document] | None) -> tuple[SynthConfig, Path, list[Document]]:
    """Validate :func:`synthesize`'s inputs: ``(config, output path, corpus)`` with the defaults filled in."""
    cfg = cfg or SynthConfig()
    bad = [s for s in cfg.stages if s not in STAGES]
    if bad or not cfg.stages:
        raise InputError(f"unknown synthesis stage(s) {bad or cfg.stages}; use {', '.join(STAGES)} (comma-separated)")
    out = Path(out)
    if out.is_dir():
        raise InputError(f"--out {out} is a folder; pass a .jsonl file")
    corpus = list(corpus) if corpus is not None else list(docs)
    if not corpus:
        raise EmptyCorpusError("no documents to synthesize from; check the corpus and the length filters")
    return cfg, out, corpus


class _NegativePool:
    """The corpus that hard negatives are mined from: its texts, each document's row and a BM25 index."""

    def __init__(self, corpus: list[Document]):
        from tessera.retrieval.bm25 import BM25Index

        self.corpus = corpus
        self.texts = [d.full_text for d in corpus]
        self.row_of = {d.id: i for i, d in enumerate(corpus)}
        self.bm25 = BM25Index.build(self.texts)


def _generate_chunk(backend, chunk: list[tuple[Document, str]], cfg: SynthConfig, seed: int) -> list[tuple]:
    """Queries for one chunk of ``(document, stage)`` jobs: ``(stage, doc, value, method, result, extra)`` each."""
    made = []
    for stage, job in (("hq", _hq_job), ("vl", _vl_job)):
        stage_docs = [d for d, s in chunk if s == stage]
        if stage_docs:
            made += [(stage, *m) for m in job(backend, stage_docs, cfg, seed)]
    return made


def _negatives_for(good: list[tuple], backend, pool: _NegativePool, cfg: SynthConfig, seed: int) -> tuple[list, list]:
    """``(BM25 hits, LLM-written negatives or None)`` for the usable queries ``good``."""
    from tessera.lm.jsonx import generate_json

    depth = max(cfg.bm25_depth, cfg.min_neg_rank + 10, cfg.filter_top_k)
    hits = pool.bm25.search_many([m[2]["query"] for m in good], k=depth) if good else []
    llm_negs = [None] * len(good)
    if cfg.llm_negative and good:
        llm_negs = generate_json(backend, [negative_messages(m[2]["query"]) for m in good], keys=("passage",),
                                 validate=lambda o: None if len(str(o.get("passage", "")).split()) >= 10 else "passage too short",
                                 retries=cfg.retries, max_new_tokens=cfg.neg_max_new_tokens, prefix='{"passage": "', seed=seed)
    return hits, llm_negs


def source_rank(hits: Sequence[tuple[int, float]], positive: int, texts: Sequence[str]) -> int | None:
    """1-based rank of the source document (or a document with the same text) among ``hits``; ``None`` if absent."""
    pos_text = _norm(texts[positive])
    for r, (i, _) in enumerate(hits):
        if i == positive or _norm(texts[i]) == pos_text:
            return r + 1
    return None


def _training_row(rid: str, made: tuple, hit, llm_neg, pool: _NegativePool, cfg: SynthConfig) -> dict:
    """One output row (query, positive, hard negatives, meta) for a usable generated query."""
    stage, d, value, method, r, extra = made
    pos = pool.row_of.get(d.id)
    if pos is None:
        raise InputError(f"document {d.id} is not in the corpus that hard negatives are mined from")
    texts = pool.texts
    neg, rank, source = bm25_hard_negative(hit, pos, texts, cfg.min_neg_rank, random.Random(f"{cfg.seed}:{rid}"))
    negs = [["", texts[neg]]]
    meta = {"domain": value.get("domain"), "key_concepts": _listify(value.get("key_concepts")),
            "reasoning_patterns": _listify(value.get("reasoning_patterns")), "parse": method,
            "attempts": r.attempts, "new_tokens": r.new_tokens, "neg_id": pool.corpus[neg].id, "neg_rank": rank,
            "neg_source": source, **extra}
    if stage == "vl":
        meta = {k: v for k, v in meta.items() if k not in ("domain", "key_concepts", "reasoning_patterns")}
    if llm_neg is not None:
        if llm_neg.ok:
            negs.append(["", str(llm_neg.value["passage"])])
        meta["llm_negative"] = "ok" if llm_neg.ok else f"failed: {llm_neg.error}"
    return {"id": rid, "doc_id": d.id, "stage": stage, "query": [cfg.instruction, str(value["query"]).strip()],
            "pos": [["", texts[pos]]], "neg": negs, "meta": meta}


def _write_chunk(made: list[tuple], backend, pool: _NegativePool, cfg: SynthConfig, seed: int, done: set[str],
                 out: Path) -> tuple[int, int, int]:
    """Mine negatives for a generated chunk and append its rows not yet in ``out`` (failures to the failures
    file, queries the round-trip filter drops to the rejected file); ``(rows written, failures, rejected)``."""
    from tessera.data.jsonl import append_jsonl

    good = [m for m in made if m[2] is not None]
    hits, llm_negs = _negatives_for(good, backend, pool, cfg, seed)
    written = failed = rejected = 0
    g = 0
    for m in made:
        stage, d, value, _method, r, _extra = m
        rid = f"{d.id}/{stage}"
        if rid in done:
            g += value is not None
            continue
        if value is None:
            append_jsonl(failures_path(out), {"id": rid, "doc_id": d.id, "stage": stage, "attempts": r.attempts,
                                              "error": r.error, "raw": [x[:2000] for x in r.raw]})
            failed += 1
            continue
        row = _training_row(rid, m, hits[g], llm_negs[g], pool, cfg)
        rank = source_rank(hits[g], pool.row_of[d.id], pool.texts)
        row["meta"]["source_rank"] = rank
        g += 1
        if cfg.filter_top_k and (rank is None or rank > cfg.filter_top_k):
            append_jsonl(rejected_path(out), {"id": rid, "doc_id": d.id, "stage": stage, "query": row["query"][1],
                                              "source_rank": rank, "top_k": cfg.filter_top_k})
            rejected += 1
            continue
        append_jsonl(out, row)
        written += 1
    return written, failed, rejected


def synthesize(docs: Sequence[Document], backend, out: str | Path, cfg: SynthConfig | None = None,
               corpus: Sequence[Document] | None = None, progress: Callable[[int, int], None] | None = None) -> dict:
    """Generate ReasonIR rows for ``docs`` (already seeded, sampled and sharded) into ``out`` (JSONL, appended).

    ``corpus`` (default ``docs``) is what BM25 mines hard negatives from; pass the
    whole corpus when ``docs`` is a sample.  Returns the run's counters; call
    :func:`synth_stats` for the report over the whole output file.
    """
    cfg, out, corpus = _check_synth_inputs(docs, out, cfg, corpus)
    done = finished_ids(out)
    # chunks (and their seeds) are cut from the whole job list, finished or not, so a resumed run
    # generates each remaining row exactly as an uninterrupted run would
    all_jobs = [(d, s) for d in docs for s in cfg.stages]
    jobs = [(d, s) for d, s in all_jobs if f"{d.id}/{s}" not in done]
    run = {"jobs": len(jobs), "skipped_finished": len(docs) * len(cfg.stages) - len(jobs), "written": 0, "failed": 0,
           "rejected": 0, "new_tokens": 0, "seconds": 0.0}
    if not jobs:
        return run
    pool = _NegativePool(corpus)
    tok0, t0 = backend.stats.new_tokens, time.perf_counter()
    n_done = 0
    for c, start in enumerate(range(0, len(all_jobs), cfg.chunk_size)):
        chunk = all_jobs[start:start + cfg.chunk_size]
        todo = sum(f"{d.id}/{s}" not in done for d, s in chunk)
        if not todo:
            continue
        # a chunk a kill left half-written is generated whole (batch make-up and per-position seeds as in
        # an uninterrupted run); only its missing rows are written
        seed = cfg.seed * 100_003 + c
        made = _generate_chunk(backend, chunk, cfg, seed)
        written, failed, rejected = _write_chunk(made, backend, pool, cfg, seed, done, out)
        run["written"] += written
        run["failed"] += failed
        run["rejected"] += rejected
        n_done += todo
        if progress is not None:
            progress(n_done, len(jobs))
    run["new_tokens"] = backend.stats.new_tokens - tok0
    elapsed = time.perf_counter() - t0
    run["seconds"] = round(elapsed, 2)
    run["rows_per_hour"] = round(3600 * run["written"] / elapsed, 1) if elapsed > 0 else 0.0
    run["tokens_per_s"] = round(run["new_tokens"] / run["seconds"], 3) if run["seconds"] else 0.0
    return run


def _dist(xs: list[float]) -> dict:
    if not xs:
        return {"n": 0}
    xs = sorted(xs)
    q = lambda p: xs[min(len(xs) - 1, int(p * len(xs)))]  # noqa: E731
    return {"n": len(xs), "mean": round(statistics.fmean(xs), 2), "min": xs[0], "p10": q(0.1), "median": q(0.5),
            "p90": q(0.9), "max": xs[-1]}


def synth_stats(out: str | Path, run: dict | None = None, extra: dict | None = None, write: bool = True) -> dict:
    """The report over everything in ``out`` and its failures file: rows and failures per stage, query and
    document lengths (words), how replies were parsed, attempts, hard-negative ranks and sources, failure
    reasons; ``run`` (this invocation's counters) and ``extra`` are added.  Written to ``<out>.stats.json``."""
    from tessera.config import atomic_write_text
    from tessera.data.jsonl import read_jsonl

    out = Path(out)
    rows = read_jsonl(out, skip_bad=True) if out.is_file() else []
    fails = read_jsonl(failures_path(out), skip_bad=True) if failures_path(out).is_file() else []
    rejected = read_jsonl(rejected_path(out), skip_bad=True) if rejected_path(out).is_file() else []
    report: dict = {"out": str(out), "rows": len(rows), "failures": len(fails), "rejected": len(rejected),
                    "kept_fraction": round(len(rows) / max(1, len(rows) + len(rejected)), 4),
                    "samples": _samples(rows, rejected), "stages": {}}
    for stage in sorted({r.get("stage") for r in rows} | {f.get("stage") for f in fails}):
        rs = [r for r in rows if r.get("stage") == stage]
        fs = [f for f in fails if f.get("stage") == stage]
        metas = [r.get("meta", {}) for r in rs]
        report["stages"][stage] = {
            "rows": len(rs), "failures": len(fs),
            "success_rate": round(len(rs) / max(1, len(rs) + len(fs)), 4),
            "query_words": _dist([len(r["query"][1].split()) for r in rs]),
            "doc_words": _dist([len(r["pos"][0][1].split()) for r in rs]),
            "parse": dict(Counter(m.get("parse") for m in metas)),
            "attempts": dict(Counter(str(m.get("attempts")) for m in metas)),
            "neg_rank": _dist([m["neg_rank"] for m in metas if m.get("neg_rank") is not None]),
            "neg_source": dict(Counter(m.get("neg_source") for m in metas)),
            "llm_negative": dict(Counter(str(m.get("llm_negative", "off")).split(":")[0] for m in metas)),
            "failure_reasons": dict(Counter(str(f.get("error")) for f in fs).most_common(5)),
        }
        if stage == "vl":
            report["stages"][stage]["target_words"] = _dist([m.get("target_words") for m in metas if m.get("target_words")])
    if run is not None:
        report["run"] = run
    if extra:
        report.update(extra)
    if write:
        atomic_write_text(stats_path(out), json.dumps(report, indent=2, ensure_ascii=False))
    return report


def _samples(rows: list[dict], rejected: list[dict], n: int = 5) -> dict:
    """A seeded sample of kept queries (with their source document's BM25 rank) and of rejected ones."""
    rng = random.Random(0)
    kept = [{"query": r["query"][1], "doc_id": r.get("doc_id"), "source_rank": r.get("meta", {}).get("source_rank")}
            for r in rows]
    drop = [{k: r.get(k) for k in ("query", "doc_id", "source_rank")} for r in rejected]
    return {"kept": rng.sample(kept, min(n, len(kept))), "rejected": rng.sample(drop, min(n, len(drop)))}


def config_dict(cfg: SynthConfig) -> dict:
    d = asdict(cfg)
    d["stages"] = list(cfg.stages)
    return d
