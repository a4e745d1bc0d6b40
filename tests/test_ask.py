"""`tessera ask` end to end (tiny random Llama and the embedded SmolLM2) and its error paths."""

import json

import pytest

from tessera_testing import run_cli
from tessera.ask import Source, ask, build_messages, fit_sources
from tessera.errors import ContextTooLongError, EmptyCorpusError, InputError
from tessera.retrieval.corpus_index import CorpusIndex


@pytest.fixture()
def small_corpus(tmp_path):
    d = tmp_path / "corpus"
    d.mkdir()
    (d / "tea.md").write_text("# Tea\n\nGreen tea is steeped at 80 degrees for two minutes. Black tea takes boiling water.\n")
    (d / "bikes.txt").write_text("A bicycle chain should be oiled every few hundred kilometres. Tyres need regular pumping.\n")
    (d / "more.jsonl").write_text(json.dumps({"id": "k1", "title": "Kites", "text": "Kites fly best in steady wind."}) + "\n")
    return d


def test_ask_cli_json_with_tiny_model(small_corpus, tiny_lm_dir):
    r = run_cli("ask", "At what temperature is green tea steeped?", "--corpus", str(small_corpus),
                "--lm", str(tiny_lm_dir), "--k", "2", "--max-new-tokens", "6", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["sources"][0]["number"] == 1 and out["sources"][0]["doc_id"] == "tea.md"
    assert out["sources"][0]["title"] == "Tea"
    assert "80 degrees" in out["sources"][0]["text"]
    assert out["stats"]["new_tokens"] <= 6 and out["stats"]["prompt_tokens"] > 20


def test_ask_cli_streams_text_and_lists_sources(small_corpus, tiny_lm_dir):
    r = run_cli("--quiet", "ask", "how often to oil a bicycle chain", "--corpus", str(small_corpus),
                "--lm", str(tiny_lm_dir), "--max-new-tokens", "4")
    assert r.returncode == 0, r.stderr
    assert "Sources" in r.stdout and "bikes.txt" in r.stdout


def test_index_cache_reused_and_keyed_by_content(small_corpus, tessera_home):
    (small_corpus / "unique.txt").write_text("Only this test indexes a note on glass blowing.")
    first = CorpusIndex.open(str(small_corpus))
    again = CorpusIndex.open(str(small_corpus))
    assert first.built and not again.built and again.path == first.path
    assert [p.id for p in again.passages] == [p.id for p in first.passages]
    (small_corpus / "tea.md").write_text("# Tea\n\nOolong is between green and black tea.\n")
    changed = CorpusIndex.open(str(small_corpus))
    assert changed.built and changed.path != first.path


def test_interrupted_index_build_leaves_no_entry(small_corpus, tessera_home, monkeypatch):
    from tessera.retrieval import bm25

    (small_corpus / "new.txt").write_text("A fresh document about sailing boats.")
    real_save = bm25.BM25Index.save

    def interrupted(self, folder):
        real_save(self, folder)
        raise KeyboardInterrupt

    monkeypatch.setattr(bm25.BM25Index, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        CorpusIndex.open(str(small_corpus))
    leftovers = [p for p in (tessera_home / "indexes").iterdir() if (p / "done").exists() is False]
    assert leftovers == []
    monkeypatch.setattr(bm25.BM25Index, "save", real_save)
    rebuilt = CorpusIndex.open(str(small_corpus))
    assert rebuilt.built and (rebuilt.path / "done").is_file()
    assert rebuilt.search("sailing boats", 1)[0].passage.doc_id == "new.txt"


def test_sources_trimmed_to_fit_prompt_budget(tiny_lm):
    long = " ".join(["word"] * 600)
    srcs = [Source(i + 1, f"d{i}", "", f"d{i}#0", 1.0, long, 0, len(long)) for i in range(3)]
    kept, ids = fit_sources(tiny_lm, "a question?", srcs, max_prompt_tokens=700)
    assert ids.shape[1] <= 700
    assert 1 <= len(kept) < 3
    assert kept[-1].text and long.startswith(kept[-1].text.strip()[:50])
    with pytest.raises(ContextTooLongError, match="shorten the question"):
        fit_sources(tiny_lm, "why " * 800, srcs, max_prompt_tokens=700)


def test_prompt_numbers_sources():
    msgs = build_messages("Q?", [Source(1, "a", "Alpha", "a#0", 1.0, "first", 0, 5), Source(2, "b", "", "b#0", 1.0, "second", 0, 6)])
    assert "[1] Alpha\nfirst" in msgs[-1]["content"] and "[2] second" in msgs[-1]["content"]


def test_empty_question_and_empty_corpus(tmp_path, tiny_lm):
    with pytest.raises(InputError, match="empty"):
        ask("  ", lm=tiny_lm)
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "blank.txt").write_text("   \n")
    with pytest.raises(EmptyCorpusError):
        ask("anything?", corpus=str(tmp_path / "e"), lm=tiny_lm)


@pytest.mark.integration
def test_ask_embedded_model_answers_python_question(embedded_lm):
    result = ask("How do I give a function parameter a default value?", lm=embedded_lm, max_new_tokens=48)
    # the "compound" topic repeats the "function" topic verbatim
    assert result.sources[0].doc_id in ("function", "compound")
    assert any("default parameter values" in s.text.lower() for s in result.sources)
    assert len(result.answer.split()) >= 5
    assert result.stats.new_tokens > 0 and result.timings["retrieve_s"] < 1.0
    assert result.corpus == "python-docs"


def test_ask_nest_decoding_and_citations_with_tiny_model(small_corpus, tiny_lm):
    r = ask("At what temperature is green tea steeped?", corpus=str(small_corpus), lm=tiny_lm, k=2,
            max_new_tokens=8, decode="nest", cite=True)
    assert r.decode == "nest" and r.nest is not None
    assert r.answer == r.nest.text.strip()
    assert r.stats.new_tokens == r.nest.stats.new_tokens > 0
    d = json.loads(json.dumps(r.to_dict()))
    assert d["nest"]["stats"]["new_tokens"] == r.stats.new_tokens
    source_docs = {s.doc_id for s in r.sources}
    for st in d["statements"]:
        assert all(c["doc_id"] in source_docs for c in st["cited"])


def test_ask_rejects_unknown_decode(tiny_lm):
    with pytest.raises(InputError, match="--decode"):
        ask("q?", lm=tiny_lm, decode="beam")
