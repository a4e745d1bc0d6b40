"""ReasonIR synthesis: prompts, seed documents, shards, BM25 rank-20 negatives, resumption, the CLI."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "lm"))

from scripted import ScriptedBackend  # noqa: E402

from tessera.data.jsonl import read_jsonl  # noqa: E402
from tessera.data.types import Document  # noqa: E402
from tessera.errors import InputError  # noqa: E402
from tessera.retrieval import synth as S  # noqa: E402
from tessera.retrieval.bm25 import BM25Index  # noqa: E402
from tessera_testing import run_cli  # noqa: E402

TOPICS = ["protein folding chaperones", "volcanic ash aviation", "bayesian priors inference", "coral reef bleaching",
          "lithium battery anodes", "malaria drug resistance", "glacier mass balance", "neural network pruning"]


def corpus(n: int = 40) -> list[Document]:
    docs = []
    for i in range(n):
        t = TOPICS[i % len(TOPICS)]
        docs.append(Document(f"d{i}", f"Study {i} on {t}", f"We report findings about {t} number {i}. " * 6 + f"Extra detail {i} here."))
    return docs


def test_hq_prompt_names_domain_concepts_patterns_then_query():
    doc = Document("x", "Title", "word " * 400)
    msgs = S.hq_messages(doc, max_doc_words=50)
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user"]
    sys_text = msgs[0]["content"]
    assert sys_text.index("domain") < sys_text.index("key concepts") < sys_text.index("reasoning") < sys_text.index("Then write the query")
    assert "Do not mention the document" in sys_text
    example = json.loads(msgs[2]["content"])
    assert list(example) == list(S.HQ_KEYS)  # the worked example names the three things before the query
    assert msgs[3]["content"].endswith("...") and len(msgs[3]["content"].split()) < 60  # cut to max_doc_words
    vl = S.vl_messages(doc, 120)
    assert "about 120 words" in vl[3]["content"]
    assert "Query: q?" in S.negative_messages("q?")[3]["content"]


def test_vl_lengths_scaled_and_seeded():
    assert S.vl_word_range(4096) == (300, 2000)  # the paper's range when the budget allows it
    lo, hi = S.vl_word_range(256)
    assert lo == 40 and hi == int(0.7 * 256)
    t = [S.vl_target_words(f"d{i}", 0, (40, 179)) for i in range(50)]
    assert t == [S.vl_target_words(f"d{i}", 0, (40, 179)) for i in range(50)] and min(t) >= 40 and max(t) <= 179 and len(set(t)) > 10


def test_check_query():
    assert S.check_query("too short") is not None
    assert S.check_query(S.EXAMPLE_HQ["query"]) == "query copies the worked example"
    assert S.check_query("Based on this abstract, why would a trial of this drug fail in older adults?") == "query mentions the document"
    assert S.check_query("Why would a trial of this drug fail in older adults with kidney disease?") is None


def test_seed_documents_dedupe_length_and_quality_hook():
    docs = [Document("a", "", "one two three " * 20), Document("b", "", "ONE two  three " * 20), Document("c", "", "short"),
            Document("d", "", "long " * 100), Document("e", "", "keep me " * 30)]
    kept, counts = S.seed_documents(docs, min_words=10, max_words=80, quality_filter=lambda d: d.id != "e")
    assert [d.id for d in kept] == ["a"]
    assert counts == {"input": 5, "duplicates": 1, "too_short": 1, "too_long": 1, "quality": 1, "kept": 1}


def test_shards_partition_a_seeded_sample():
    docs = corpus(40)
    sample = S.select_documents(docs, limit=10, seed=3)
    assert sample == S.select_documents(docs, limit=10, seed=3) and sample != S.select_documents(docs, limit=10, seed=4)
    shards = [S.select_documents(docs, limit=10, shard=(i, 3), seed=3) for i in range(3)]
    assert sorted(d.id for s in shards for d in s) == sorted(d.id for d in sample)
    assert S.parse_shard("1/4") == (1, 4)
    for bad in ("4/4", "x", "1/0"):
        with pytest.raises(InputError):
            S.parse_shard(bad)


def test_bm25_negative_is_rank_20_or_lower_and_never_the_positive():
    docs = corpus(60)
    texts = [d.full_text for d in docs]
    texts[30] = texts[0]  # a duplicate of the positive under another id
    bm25 = BM25Index.build(texts)
    for pos in (0, 5, 13):
        q = texts[pos].split("\n")[0]
        hits = bm25.search(q, 100)
        neg, rank, source = S.bm25_hard_negative(hits, pos, texts)
        assert source == "bm25" and rank >= 20
        assert neg != pos and texts[neg] != texts[pos]
        ranked_rows = [i for i, _ in hits]
        assert ranked_rows.index(neg) + 1 == rank
        # everything between rank 20 and the negative is the positive or its duplicate
        assert all(texts[i] == texts[pos] for i in ranked_rows[19:rank - 1])
    # BM25 found fewer than 20 documents: the lowest-ranked non-positive; none at all: a random non-positive
    neg, rank, source = S.bm25_hard_negative([(0, 5.0), (3, 2.0)], 0, texts)
    assert (neg, rank, source) == (3, 2, "low_rank")
    neg, rank, source = S.bm25_hard_negative([(0, 5.0), (30, 4.0)], 0, texts)
    assert source == "random" and texts[neg] != texts[0] and rank is None


def good_reply(conv, temperature):
    if conv[-1]["content"].startswith("Query:"):  # the LLM hard-negative prompt: no usable passage
        return "no passage here"
    doc = conv[-1]["content"].split("\n")[1]
    if "Length:" in conv[-1]["content"]:
        return f'{doc} long query with many words about a realistic situation"}}'
    return f'science", "key_concepts": ["a"], "reasoning_patterns": ["b"], "query": "How would {doc} change a realistic decision?"}}'


class Interrupt(Exception):
    pass


def test_resume_after_interruption_has_no_duplicates(tmp_path):
    docs = corpus(40)
    out = tmp_path / "rows.jsonl"
    cfg = S.SynthConfig(stages=("hq", "vl"), chunk_size=4)
    calls = {"n": 0}

    def flaky(conv, t):
        calls["n"] += 1
        if calls["n"] > 14:  # dies in the middle of the fourth chunk
            raise Interrupt()
        return good_reply(conv, t)

    sample = S.select_documents(docs, limit=10, seed=0)
    with pytest.raises(Interrupt):
        S.synthesize(sample, ScriptedBackend(flaky), out, cfg, corpus=docs)
    partial = read_jsonl(out)
    assert 0 < len(partial) < 20
    run = S.synthesize(sample, ScriptedBackend(good_reply), out, cfg, corpus=docs)
    rows = read_jsonl(out)
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids)) == 20 and run["skipped_finished"] == len(partial)
    assert set(ids) == {f"{d.id}/{s}" for d in sample for s in ("hq", "vl")}
    again = S.synthesize(sample, ScriptedBackend(good_reply), out, cfg, corpus=docs)
    assert again["jobs"] == 0 and len(read_jsonl(out)) == 20
    # rows are the training format and train.py reads them
    from tessera.retrieval.train import read_training_rows

    data = read_training_rows(str(out), n_negatives=1)
    assert data.n_rows == 20 and all(ex.pos != ex.negs[0] for ex in data.examples)
    r = rows[0]
    assert r["query"][0] == S.DEFAULT_INSTRUCTION and r["meta"]["neg_rank"] >= 20 and r["meta"]["parse"] in ("json", "repaired", "fields")


def test_failures_recorded_and_skipped_and_stats(tmp_path):
    docs = corpus(20)
    out = tmp_path / "rows.jsonl"

    def reply(conv, t):
        return "nonsense" if "Study 3 " in conv[-1]["content"] else good_reply(conv, t)

    b = ScriptedBackend(reply)
    run = S.synthesize(docs[:5], b, out, S.SynthConfig(llm_negative=True), corpus=docs)
    assert run["written"] == 4 and run["failed"] == 1
    fails = read_jsonl(S.failures_path(out))
    assert fails[0]["id"] == "d3/hq" and fails[0]["attempts"] == 3 and len(fails[0]["raw"]) == 3
    # LLM hard negatives: the scripted reply has no "passage", so they fail and are recorded per row
    assert all(r["meta"]["llm_negative"].startswith("failed") and len(r["neg"]) == 1 for r in read_jsonl(out))
    again = S.synthesize(docs[:5], b, out, S.SynthConfig(), corpus=docs)
    assert again["jobs"] == 0  # failures are not retried unless asked
    stats = S.synth_stats(out, again)
    assert stats["rows"] == 4 and stats["failures"] == 1 and stats["stages"]["hq"]["success_rate"] == 0.8
    assert json.loads(S.stats_path(out).read_text())["stages"]["hq"]["query_words"]["n"] == 4


def test_cli_synth_end_to_end_on_tiny_lm(tmp_path, tiny_lm_dir):
    folder = tmp_path / "docs"
    folder.mkdir()
    for d in corpus(25):
        (folder / f"{d.id}.txt").write_text(d.full_text)
    out = tmp_path / "rows.jsonl"
    r = run_cli("retrieval", "synth", "--corpus", str(folder), "--out", str(out), "--limit", "2", "--lm", str(tiny_lm_dir),
                "--hq-tokens", "8", "--seed", "1")
    assert r.returncode == 0, r.stderr
    stats = json.loads(S.stats_path(out).read_text())
    assert stats["rows"] + stats["failures"] == 2  # a random-weight LM fails; recorded, not a crash
    assert stats["backend"]["conversations"] >= 2 and stats["shard"] == "0/1"
    bad = run_cli("retrieval", "synth", "--corpus", str(folder), "--out", str(out), "--shard", "2/2")
    assert bad.returncode == 2 and "shard" in bad.stderr
    bad = run_cli("retrieval", "synth", "--corpus", str(folder), "--out", str(out), "--stages", "xx", "--lm", str(tiny_lm_dir))
    assert bad.returncode == 2 and "stage" in bad.stderr


def test_cli_synth_survives_kill_9(tmp_path, tiny_lm_dir):
    """``kill -9`` after the first chunk: the rerun writes the remaining rows (and failures) exactly as
    an uninterrupted run does, each id once."""
    from tessera_testing import kill_midway

    folder = tmp_path / "docs"
    folder.mkdir()
    for d in corpus(25):
        (folder / f"{d.id}.txt").write_text(d.full_text)
    args = ["retrieval", "synth", "--corpus", str(folder), "--limit", "4", "--stages", "hq,vl", "--lm", str(tiny_lm_dir),
            "--hq-tokens", "8", "--vl-tokens", "8", "--batch-size", "1", "--seed", "3"]
    ref, out = tmp_path / "ref.jsonl", tmp_path / "rows.jsonl"
    assert run_cli(*args, "--out", str(ref)).returncode == 0

    def lines(p):
        return p.read_bytes().count(b"\n") if p.is_file() else 0

    kill_midway([*args, "--out", str(out)], lambda: lines(out) + lines(S.failures_path(out)) >= 2)
    assert lines(out) + lines(S.failures_path(out)) < 8
    r = run_cli(*args, "--out", str(out))
    assert r.returncode == 0, r.stderr

    def rows(p):
        got = read_jsonl(p) if p.is_file() else []
        return sorted(got, key=lambda x: x["id"])

    assert rows(out) == rows(ref) and rows(S.failures_path(out)) == rows(S.failures_path(ref))
    ids = [x["id"] for x in rows(out) + rows(S.failures_path(out))]
    assert len(ids) == len(set(ids)) == 8


def test_round_trip_filter_drops_queries_bm25_cannot_trace_back(tmp_path):
    docs = corpus(24)
    out = tmp_path / "rows.jsonl"

    def reply(conv, t):
        if "Study 2 " in conv[-1]["content"]:  # a query that has nothing to do with its document
            return 'x", "key_concepts": ["a"], "reasoning_patterns": ["b"], "query": "What is the airspeed velocity of an unladen swallow in spring?"}'
        return good_reply(conv, t)

    run = S.synthesize(docs[:6], ScriptedBackend(reply), out, S.SynthConfig(filter_top_k=3), corpus=docs)
    assert (run["written"], run["rejected"], run["failed"]) == (5, 1, 0)
    dropped = read_jsonl(S.rejected_path(out))
    assert [r["id"] for r in dropped] == ["d2/hq"] and (dropped[0]["source_rank"] is None or dropped[0]["source_rank"] > 3)
    kept = read_jsonl(out)
    assert all(1 <= r["meta"]["source_rank"] <= 3 for r in kept)
    again = S.synthesize(docs[:6], ScriptedBackend(reply), out, S.SynthConfig(filter_top_k=3), corpus=docs)
    assert again["jobs"] == 0, "rejected queries are not generated again"
    stats = S.synth_stats(out, run)
    assert (stats["rows"], stats["rejected"], stats["kept_fraction"]) == (5, 1, round(5 / 6, 4))
    assert len(stats["samples"]["kept"]) == 5 and stats["samples"]["rejected"][0]["doc_id"] == "d2"
    assert stats["run"]["rows_per_hour"] > 0
    unfiltered = S.synthesize(docs[:6], ScriptedBackend(reply), tmp_path / "all.jsonl", S.SynthConfig(), corpus=docs)
    assert unfiltered["written"] == 6 and unfiltered["rejected"] == 0
