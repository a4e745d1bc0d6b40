"""benchmarks/gpu/mixed_modal.sh --smoke: the GPU script's path (both settings as two processes, the gate, MoT,
the MoMa grid, MoD inference, goals) runs on CPU in about a minute and records what the issue asks for."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GOALS = {"dense_plateau", "dense_generation_gate", "mot_image_steps_ratio_chameleon", "mot_image_steps_ratio_transfusion",
         "moma_best_flops_saving", "mod_inference_flops_saving", "mot_wall_per_step_ratio"}


def test_gpu_script_smoke_runs_every_phase_on_cpu(tmp_path):
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu" / "mixed_modal.sh"), "--smoke", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    cham = json.loads((tmp_path / "mixed_modal_chameleon.json").read_text())
    tf = json.loads((tmp_path / "mixed_modal_transfusion.json").read_text())
    for res in (cham, tf):
        assert set(res["goals"]) == GOALS
        assert all({"target", "measured", "met"} <= set(g) for g in res["goals"].values())
        assert res["machine"]["device"] == "cpu" and res["wall_s"] > 0
    for res, setting in ((cham, "chameleon"), (tf, "transfusion")):
        S = res["settings"][setting]
        assert {"dense_s0", "mot_s0"} <= set(S["runs"]) and isinstance(S["gate"]["passed"], bool)
        assert S["runs"]["dense_s0"]["curve"][-1]["step"] == 12
        assert 0 < S["timing"]["ratio_to_dense"]["mot"] < 10
        assert (tmp_path / f"mixed_modal_{setting}.png").stat().st_size > 0
    grid = cham["settings"]["chameleon"]["moma_grid"]
    assert len(grid) == 6 and grid["moma_4t4i"]["params"]["total"] > grid["moma_4t4i"]["params"]["active"]
    mi = cham["settings"]["chameleon"]["mod_inference"]
    # the causal routers skip the block for unselected tokens: fewer FLOPs per token than dense
    assert mi["flops_saving"] > 1.0 and 0.0 <= mi["selected_fraction_aux"] <= 1.0
    assert cham["settings"]["chameleon"]["runs"]["dense_mod_s0"]["steps"] > 12  # dense's training FLOPs: more steps


def test_unknown_phase_is_a_one_line_error(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "mixed_modal.py"), "--smoke", "--phases", "mot,grid",
                           "--runs-dir", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "unknown --phases" in proc.stderr and not list(tmp_path.iterdir())


def test_active_parameters_count_one_expert_of_the_tokens_own_group():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from mixed_modal import param_counts

    from tessera.models.decoder import MixedModalConfig

    base = MixedModalConfig(vocab_size=300, d_model=32, n_layers=2, n_heads=4).to_dict()
    dense = param_counts({**base, "variant": "dense"})
    assert dense["active"] == dense["total"]
    assert param_counts({**base, "variant": "mot"})["active"] == dense["total"]  # one modality's copy
    for k in (1, 2, 4):  # MoMa: the other group is idle, and one expert of the own group runs (plus routers)
        moma = param_counts({**base, "variant": "moma", "n_text_experts": k, "n_image_experts": k})
        assert dense["total"] <= moma["active"] < 1.1 * dense["total"] < moma["total"]


def test_two_workers_train_runs_side_by_side_and_stop_at_the_match(tmp_path):
    """The default CPU path: runs in two spawned processes; MoT gets dense's final losses as stop targets."""
    out = tmp_path / "mm.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "mixed_modal.py"), "--smoke", "--workers", "2",
                           "--threads", "2", "--settings", "chameleon", "--phases", "mot", "--runs-dir", str(tmp_path / "runs"),
                           "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    runs = json.loads(out.read_text())["settings"]["chameleon"]["runs"]
    assert set(runs) == {"dense_s0", "mot_s0"}
    dense_last = runs["dense_s0"]["curve"][-1]
    mot = runs["mot_s0"]
    from tessera.config import load_config
    from tessera.recipes.mixed_modal_pretrain import Config

    cfg = load_config(Config, Path(mot["dir"]) / "config.yaml")  # what the MoT run was given
    assert (cfg.stop_text_loss, cfg.stop_image_loss, cfg.stop_model_loss) == (
        dense_last["val_text_loss"], dense_last["val_image_loss"], dense_last["val_model_loss"])
    # stopped at the first evaluation that reached all three of dense's final losses, or ran to the end without
    last = mot["curve"][-1]
    reached = all(last[k] <= dense_last[k] for k in ("val_text_loss", "val_image_loss", "val_model_loss"))
    assert mot["stopped_at_match"] == (mot["steps"] < 12) and (not mot["stopped_at_match"] or reached)
    assert list((tmp_path / "runs" / "smoke").glob("judge_s0_*.safetensors"))  # the judge, shared by the seed's runs


def test_retime_replaces_only_the_timing_of_a_recording(tmp_path):
    """--retime reruns the timing phase on the recorded config (shrunk here) and touches nothing else."""
    rec = json.loads((ROOT / "benchmarks" / "results" / "mixed_modal.json").read_text())
    rec["config"]["base"].update(d_model=32, batch_size=8, threads=1)
    rec["settings"] = {"chameleon": {**rec["settings"]["chameleon"]}}
    out = tmp_path / "mm.json"
    out.write_text(json.dumps(rec))
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "mixed_modal.py"), "--retime", "--out", str(out),
                           "--timing-steps", "3", "--timing-rounds", "1", "--threads", "1"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    new = json.loads(out.read_text())
    timing = new["settings"]["chameleon"]["timing"]
    assert timing != rec["settings"]["chameleon"]["timing"] and 0 < timing["ratio_to_dense"]["mot"] < 10
    wall = new["goals"]["mot_wall_per_step_ratio"]
    assert wall["measured"] == timing["ratio_to_dense"]["mot"] and wall["met"] == (wall["measured"] <= 1.3)
    assert new["timing_rerun"]["timing_before"]["chameleon"] == rec["settings"]["chameleon"]["timing"]
    for key in ("goals", "settings"):  # everything else as recorded
        for k in rec[key]:
            if k not in ("mot_wall_per_step_ratio", "chameleon"):
                assert new[key][k] == rec[key][k]
    assert {k: v for k, v in new["settings"]["chameleon"].items() if k != "timing"} == \
        {k: v for k, v in rec["settings"]["chameleon"].items() if k != "timing"}


def test_retime_without_a_recording_is_a_one_line_error(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "mixed_modal.py"), "--retime", "--out",
                           str(tmp_path / "none.json")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--retime needs a recorded run" in proc.stderr and not list(tmp_path.iterdir())
