"""Checkpoints hold no pickle: safetensors + JSON round trips, planted pickles refused without running,
old checkpoints converted through torch's weights-only reader."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from torch import nn

from tessera.errors import InputError
from tessera.train import LoopState, load_checkpoint, save_checkpoint
from tessera.train.loop import _state_dicts
from tessera.train.checkpoint import (convert_legacy, load_tensors, read_checkpoint, resolve_checkpoint, save_tensors,
                                      write_checkpoint)
from tessera_testing import run_cli


class Tied(nn.Module):
    """Embedding and output layer share one weight (as SmolLM2's do)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 6)
        self.mid = nn.Linear(6, 6)
        self.out = nn.Linear(6, 11, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, x):
        return self.out(torch.tanh(self.mid(self.emb(x))))


class Payload:
    """Unpickling this writes a marker file: the proof that a loader ran code."""

    marker = ""

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "code ran"))


def plant_pickle(path: Path, marker: Path) -> None:
    p = Payload()
    Payload.marker = str(marker)
    path.write_bytes(pickle.dumps({"model": p, "state": {}}, protocol=2))


def train_steps(model, opt, steps, seed):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randint(0, 11, (4, 5), generator=g)
        loss = nn.functional.cross_entropy(model(x).flatten(0, 1), x.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_roundtrip_tied_weights_optimizer_and_rng_then_resume_is_bit_exact(tmp_path):
    torch.manual_seed(0)
    a = Tied()
    opt_a = torch.optim.AdamW(a.parameters(), lr=1e-2, betas=(0.9, 0.95))
    train_steps(a, opt_a, 3, seed=1)
    torch.manual_seed(7)
    save_checkpoint(tmp_path / "ck", a, opt_a, LoopState(step=3, flops=1.5, step_times=[0.1, 0.2]), {"cfg": {"d": 6}})
    noise_a = torch.rand(3)
    train_steps(a, opt_a, 2, seed=2)

    files = sorted(p.name for p in (tmp_path / "ck").iterdir())
    assert files == ["model.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json"]
    meta = json.loads((tmp_path / "ck" / "state.json").read_text())
    assert meta["format"] == "tessera-checkpoint/1" and meta["loop"]["step"] == 3
    assert meta["optimizer"]["param_groups"][0]["tuples"] == ["betas"]

    torch.manual_seed(99)
    b = Tied()
    opt_b = torch.optim.AdamW(b.parameters(), lr=1e-2, betas=(0.9, 0.95))
    state, extra = load_checkpoint(tmp_path / "ck", b, opt_b)
    assert state.step == 3 and state.flops == 1.5 and state.step_times == [0.1, 0.2] and extra == {"cfg": {"d": 6}}
    assert b.out.weight is b.emb.weight  # still tied after loading
    assert tuple(opt_b.param_groups[0]["betas"]) == (0.9, 0.95)
    assert torch.equal(torch.rand(3), noise_a)  # the RNG state came back
    train_steps(b, opt_b, 2, seed=2)
    for (na, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(pa, pb), na


def test_plain_optimizer_state_dict_roundtrip(tmp_path):
    m = Tied()
    opt = torch.optim.AdamW([{"params": [m.emb.weight]}, {"params": list(m.mid.parameters()), "weight_decay": 0.0}], lr=1e-3)
    train_steps(m, opt, 1, seed=0)
    write_checkpoint(tmp_path / "ck", dict(m.named_parameters()), opt.state_dict(), {"step": 1})
    back = read_checkpoint(tmp_path / "ck")["optimizer"]
    ref = opt.state_dict()
    assert list(back["state"]) == list(ref["state"]) == [0, 1, 2]  # integer ids stay integers
    for pid, entry in ref["state"].items():
        for k, v in entry.items():
            assert torch.equal(back["state"][pid][k], v)
    assert back["param_groups"] == ref["param_groups"]
    opt2 = torch.optim.AdamW([{"params": [m.emb.weight]}, {"params": list(m.mid.parameters())}], lr=1e-3)
    opt2.load_state_dict(back)


def test_rewrite_replaces_whole_and_a_kill_between_renames_is_recovered(tmp_path):
    m = Tied()
    write_checkpoint(tmp_path / "ck", dict(m.named_parameters()), None, {"step": 1})
    write_checkpoint(tmp_path / "ck", dict(m.named_parameters()), None, {"step": 2})
    assert read_checkpoint(resolve_checkpoint(tmp_path / "ck"))["state"]["step"] == 2
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]  # no temporary or old folders left
    (tmp_path / "ck").rename(tmp_path / ".ck.old-abc")  # the moment between the two renames
    assert read_checkpoint(resolve_checkpoint(tmp_path / "ck"))["state"]["step"] == 2
    assert resolve_checkpoint(tmp_path / "nothing") is None


def test_planted_pickle_is_refused_and_does_not_run(tmp_path):
    marker = tmp_path / "pwned"
    plant_pickle(tmp_path / "checkpoint.pt", marker)
    with pytest.raises(InputError, match="old pickle checkpoint.*tessera checkpoint convert"):
        resolve_checkpoint(tmp_path / "checkpoint")
    # a pickle in place of the tensors file of an otherwise valid folder
    m = Tied()
    write_checkpoint(tmp_path / "ck", dict(m.named_parameters()), None, {"step": 1})
    plant_pickle(tmp_path / "ck" / "model.safetensors", marker)
    with pytest.raises(InputError, match="not a readable safetensors file"):
        read_checkpoint(tmp_path / "ck")
    # the converter reads tensors only: the payload is refused
    with pytest.raises(InputError, match="cannot be read as tensors only"):
        convert_legacy(tmp_path / "checkpoint.pt")
    plant_pickle(tmp_path / "classifier.safetensors", marker)
    with pytest.raises(InputError, match="not a readable safetensors file"):
        load_tensors(tmp_path / "classifier.safetensors")
    assert not marker.exists()


def test_damaged_folders_give_one_line_errors(tmp_path):
    m = Tied()
    write_checkpoint(tmp_path / "ck", dict(m.named_parameters()), None, {"step": 1})
    raw = (tmp_path / "ck" / "model.safetensors").read_bytes()
    (tmp_path / "ck" / "model.safetensors").write_bytes(raw[: len(raw) // 2])  # truncated
    with pytest.raises(InputError, match="not a readable safetensors file"):
        read_checkpoint(tmp_path / "ck")
    (tmp_path / "ck" / "state.json").write_bytes(b"\xff{not json")
    with pytest.raises(InputError, match="damaged"):
        read_checkpoint(tmp_path / "ck")
    (tmp_path / "ck" / "state.json").write_text('{"format": "something-else"}')
    with pytest.raises(InputError, match="not a tessera-checkpoint/1"):
        read_checkpoint(tmp_path / "ck")
    with pytest.raises(InputError, match="no state.json"):
        read_checkpoint(tmp_path)


def test_convert_legacy_checkpoint(tmp_path):
    m = Tied()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    train_steps(m, opt, 1, seed=0)
    old = tmp_path / "checkpoint.pt"  # what save_checkpoint wrote before: one torch.save of a dict
    msd, osd = _state_dicts(m, opt)
    torch.save({"model": msd, "optimizer": osd, "state": LoopState(step=1).to_dict(),
                "extra": {"model_config": {"d": 6}}}, old)
    out = convert_legacy(old)
    assert out == tmp_path / "checkpoint"
    m2 = Tied()
    opt2 = torch.optim.AdamW(m2.parameters(), lr=1e-3)
    state, extra = load_checkpoint(resolve_checkpoint(tmp_path / "checkpoint"), m2, opt2)
    assert state.step == 1 and extra == {"model_config": {"d": 6}}
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), m2.state_dict().values()))


def test_save_and_load_tensors(tmp_path):
    m = Tied()
    save_tensors(tmp_path / "c" / "t.safetensors", m.state_dict())
    back = load_tensors(tmp_path / "c" / "t.safetensors")
    assert set(back) == set(m.state_dict()) and all(torch.equal(back[k], v) for k, v in m.state_dict().items())


def test_cli_convert_and_show(tmp_path):
    marker = tmp_path / "pwned"
    plant_pickle(tmp_path / "evil.pt", marker)
    r = run_cli("checkpoint", "convert", str(tmp_path / "evil.pt"))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and r.stderr.startswith("error: ") and "tensors only" in r.stderr
    assert not marker.exists() and not (tmp_path / "evil").exists()
    r = run_cli("checkpoint", "show", str(tmp_path / "evil.pt"))
    assert r.returncode == 2 and "tessera checkpoint convert" in r.stderr and r.stderr.count("\n") == 1
    m = Tied()
    write_checkpoint(tmp_path / "ck", dict(m.named_parameters()), None, {"step": 4, "flops": 2.0})
    r = run_cli("checkpoint", "show", str(tmp_path / "ck"))
    assert r.returncode == 0, r.stderr
    shown = json.loads(r.stdout)
    assert shown["loop"]["step"] == 4 and shown["model_tensors"] == 3  # tied out.weight is emb.weight


def test_incomplete_folders_are_refused_and_not_chosen(tmp_path):
    m = Tied()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    train_steps(m, opt, 1, seed=0)
    write_checkpoint(tmp_path / "ck", dict(m.named_parameters()), opt.state_dict(), {"step": 1})
    (tmp_path / "ck" / "optimizer.safetensors").unlink()  # a folder half-deleted by a kill
    with pytest.raises(InputError, match="incomplete.*optimizer.safetensors"):
        read_checkpoint(tmp_path / "ck")
    # between the renames of a later save only old folders exist: the complete one with the highest step wins
    (tmp_path / "ck").rename(tmp_path / ".ck.old-a")
    write_checkpoint(tmp_path / "ck2", dict(m.named_parameters()), None, {"step": 5})
    (tmp_path / "ck2").rename(tmp_path / ".ck.old-b")
    write_checkpoint(tmp_path / "ck3", dict(m.named_parameters()), None, {"step": 3})
    (tmp_path / "ck3").rename(tmp_path / ".ck.old-c")
    assert resolve_checkpoint(tmp_path / "ck").name == ".ck.old-b"


def test_values_that_are_not_json_give_a_one_line_error(tmp_path):
    m = Tied()
    with pytest.raises(InputError, match="not JSON"):
        write_checkpoint(tmp_path / "ck", dict(m.named_parameters()), None, {"step": 1}, {"when": object()})
    assert not (tmp_path / "ck").exists() and not list(tmp_path.iterdir())
