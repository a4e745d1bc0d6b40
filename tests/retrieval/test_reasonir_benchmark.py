"""benchmarks/reasonir.py's bookkeeping: the claim split, the mean over seeds and the goals the issue names."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GOALS = {"synthetic_rows", "reasonir_synthetic_gain_points", "finetuned_minus_bm25_scifact",
         "cranfield_vaswani_loss_points", "llm_retriever_minus_bm25_scifact"}


def _bench():
    spec = importlib.util.spec_from_file_location("reasonir_bench", ROOT / "benchmarks" / "reasonir.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_claim_split_is_a_stable_fifth():
    B = _bench()
    ids = [str(i) for i in range(2000)]
    held = [i for i in ids if B.held_out(i)]
    assert 0.17 < len(held) / len(ids) < 0.23
    assert held == [i for i in reversed(ids) if B.held_out(i)][::-1], "membership depends on the id alone"


def _run(sf: float, cran: float | None = None):
    ev = {"scifact_heldout": {"ndcg@10": sf}}
    if cran is not None:
        ev |= {"cranfield": {"ndcg@10": cran}, "vaswani": {"ndcg@10": 0.70}}
    return {"eval": ev}


def test_goals_from_seed_means():
    B = _bench()
    ft = {"runs": {"a_claims/s0": _run(0.60), "a_claims/s1": _run(0.62),
                   "b_claims_synthetic/s0": _run(0.63, 0.37), "b_claims_synthetic/s1": _run(0.65, 0.39),
                   "c_claims_synthetic_crops/s0": _run(0.61), "c_claims_synthetic_crops/s1": _run(0.61)}}
    summary = B.summarise(ft, [0, 1])
    assert summary["a_claims"]["scifact_heldout"]["mean"] == 0.61 and summary["b_claims_synthetic"]["scifact_heldout"]["std"] == 0.01
    base = {"bm25": {"scifact_heldout": {"ndcg@10": 0.66}}, "minilm": {"scifact_heldout": {"ndcg@10": 0.64},
            "cranfield": {"ndcg@10": 0.385}, "vaswani": {"ndcg@10": 0.70}}}
    g = B.goals(base, summary, {"rows": 1200})
    assert set(g) == GOALS and all({"target", "measured", "met"} <= set(v) for v in g.values())
    assert g["synthetic_rows"] == {"target": 1000, "measured": 1200, "met": True}
    assert g["reasonir_synthetic_gain_points"]["measured"] == 3.0 and g["reasonir_synthetic_gain_points"]["met"]
    assert g["reasonir_synthetic_gain_points"]["best_with_synthetic"] == "b_claims_synthetic"
    assert g["reasonir_synthetic_gain_points"]["best_with_synthetic_gain"] == 3.0
    assert g["finetuned_minus_bm25_scifact"]["best_config"] == "b_claims_synthetic"
    assert g["finetuned_minus_bm25_scifact"]["measured"] == -2.0 and not g["finetuned_minus_bm25_scifact"]["met"]
    assert g["cranfield_vaswani_loss_points"]["measured"] == 0.5 and g["cranfield_vaswani_loss_points"]["met"]
    assert g["llm_retriever_minus_bm25_scifact"]["measured"] is None and not g["llm_retriever_minus_bm25_scifact"]["met"]


def test_curve_is_the_mean_over_seeds_from_claims_only_to_all_rows():
    B = _bench()
    ft = {"runs": {"a_claims/s0": _run(0.60), "a_claims/s1": _run(0.62),
                   "b_claims_synthetic/s0": _run(0.66), "b_claims_synthetic/s1": _run(0.64)},
          "curve": {"500/s0": _run(0.64), "500/s1": _run(0.64), "1000/s0": _run(0.65), "250/s0": _run(0.61)}}
    c = B._curve(ft, [0, 1])
    assert list(c) == ["0", "250", "500", "1000", "all"]
    assert c["0"]["mean"] == 0.61 and c["all"]["mean"] == 0.65 and c["500"]["std"] == 0.0
    assert c["250"]["n"] == 1 and c["1000"]["n"] == 1


def test_llm_goal_is_information_on_the_reduced_corpus():
    B = _bench()
    base = {"bm25": {"scifact_heldout": {"ndcg@10": 0.66}}, "minilm": {"scifact_heldout": {"ndcg@10": 0.64}}}
    llm = {"corpus_docs": 1170, "bm25": {"ndcg@10": 0.75}, "minilm": {"ndcg@10": 0.73},
           "smollm2_retriever": {"ndcg@10": 0.70}}
    g = B.goals(base, {}, None, llm)["llm_retriever_minus_bm25_scifact"]
    assert g["measured"] == -5.0 and not g["met"] and g["information"] and g["minilm_minus_bm25"] == -2.0
    assert "1170 documents" in g["note"]
