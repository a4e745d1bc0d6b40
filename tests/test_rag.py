"""RAG evaluation: MMLU rows answered closed-book and with retrieved passages, on a tiny random-weight LM."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "lm"))

from scripted import ScriptedBackend  # noqa: E402

from tessera.data.qa import MMLUQuestion, read_mmlu  # noqa: E402
from tessera.rag import accuracy, answer_letters, mmlu_messages, rag_eval  # noqa: E402
from tessera_testing import run_cli  # noqa: E402

ROWS = [
    "What is the capital of France?,Berlin,Paris,Rome,Madrid,B",
    "Which gas do plants absorb?,Oxygen,Nitrogen,Carbon dioxide,Helium,C",
    '"Largest planet, by mass?",Jupiter,Mars,Venus,Earth,A',
    "Water boils at sea level at?,50 C,80 C,90 C,100 C,D",
]


@pytest.fixture()
def mmlu_dir(tmp_path):
    (tmp_path / "mmlu" / "val").mkdir(parents=True)
    (tmp_path / "mmlu" / "val" / "misc_val.csv").write_text("\n".join(ROWS) + "\n")
    return tmp_path / "mmlu"


@pytest.fixture()
def docs_dir(tmp_path):
    d = tmp_path / "docs"
    d.mkdir()
    (d / "france.txt").write_text("Paris is the capital and largest city of France.")
    (d / "plants.txt").write_text("Plants absorb carbon dioxide and release oxygen during photosynthesis.")
    return d


def test_prompt_and_letter_choice(mmlu_dir):
    qs = read_mmlu(mmlu_dir)
    m = mmlu_messages(qs[0], ["Paris is the capital of France."])
    text = m[0]["content"]
    assert text.startswith("Context:\n[1] Paris is") and "A. Berlin\nB. Paris\nC. Rome\nD. Madrid" in text
    assert "Context" not in mmlu_messages(qs[0])[0]["content"]
    b = ScriptedBackend(logprobs=lambda conv, c: {"A": -3.0, "B": -0.5, "C": -2.0, "D": -math.inf})
    out = answer_letters(b, qs[:1])
    assert out[0]["pred"] == "B" and b.calls[0]["prefix"] == "Answer:"
    rows = [{"subject": "s", "answer": "B", "pred": "B"}, {"subject": "s", "answer": "A", "pred": "B"}, {"subject": "t", "answer": "C", "pred": "C"}]
    acc = accuracy(rows)
    assert acc["accuracy"] == pytest.approx(0.6667, abs=1e-4) and acc["per_subject"] == {"s": 0.5, "t": 1.0}


def test_rag_eval_tiny_lm_closed_and_rag(mmlu_dir, docs_dir, tiny_lm, tmp_path):
    from tessera.lm.local_backend import LocalBackend
    from tessera.rag import open_datastore

    qs = read_mmlu(mmlu_dir)
    b = LocalBackend(tiny_lm, batch_size=4)
    index = open_datastore(str(docs_dir))
    preds = tmp_path / "preds.jsonl"
    res = rag_eval(qs, b, index, k=1, predictions=preds)
    assert res["n_questions"] == 4 and set(res["modes"]) == {"closed", "rag"}
    assert all(0.0 <= r["accuracy"] <= 1.0 and r["n"] == 4 for r in res["modes"].values())
    rows = [json.loads(l) for l in preds.read_text().splitlines()]
    assert len(rows) == 8 and all(r["pred"] in "ABCD" for r in rows)
    assert any("Paris" in p for r in rows if r["mode"] == "rag" and r["id"].endswith("/0") for p in r["passages"])
    # the same answers when asked one by one (batching and padding do not change them)
    single = [answer_letters(LocalBackend(tiny_lm, batch_size=1), [q])[0]["pred"] for q in qs]
    assert single == [r["pred"] for r in rows if r["mode"] == "closed"]
    # resumption: nothing new is computed
    calls = b.stats.calls
    again = rag_eval(qs, b, index, k=1, predictions=preds)
    assert b.stats.calls == calls and again["modes"] == res["modes"]


def test_cli_rag_eval(mmlu_dir, docs_dir, tiny_lm_dir, tmp_path):
    out = tmp_path / "out"
    r = run_cli("rag", "eval", "--mmlu", str(mmlu_dir), "--corpus", str(docs_dir), "--lm", str(tiny_lm_dir), "--k", "1", "--out", str(out))
    assert r.returncode == 0, r.stderr
    doc = json.loads((out / "metrics.json").read_text())
    assert doc["n_questions"] == 4 and "rag_minus_closed" in doc and doc["k"] == 1
    bad = run_cli("rag", "eval", "--mmlu", str(mmlu_dir), "--mode", "open", "--out", str(out))
    assert bad.returncode == 2 and "--mode" in bad.stderr
    bad = run_cli("rag", "eval", "--mmlu", str(tmp_path / "nope"), "--out", str(out))
    assert bad.returncode == 2 and "MMLU folder" in bad.stderr


def test_mmlu_question_type():
    q = MMLUQuestion("s/val/0", "s", "q", ("a", "b", "c", "d"), "C")
    assert q.answer_index == 2
