import json
from dataclasses import dataclass, field

import pytest

from tessera.config import DumpDir, atomic_dir, atomic_file, atomic_savefig, load_config
from tessera.errors import InputError


@dataclass
class Cfg:
    seed: int = 0
    dump_dir: str = "dumps/x"
    lr: float = 1e-3
    layers: list[int] = field(default_factory=lambda: [1, 2])


def test_defaults_yaml_and_overrides(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("lr: 0.5\nseed: 3\n")
    cfg = load_config(Cfg, y, ["seed=7", "layers=[4,5]"])
    assert isinstance(cfg, Cfg)
    assert (cfg.seed, cfg.lr, cfg.layers) == (7, 0.5, [4, 5])


@pytest.mark.parametrize("overrides,match", [(["seed=abc"], "bad config value"), (["nosuch=1"], "known keys"), (["seed"], "key=value")])
def test_bad_overrides(overrides, match):
    with pytest.raises(InputError, match=match):
        load_config(Cfg, None, overrides)


def test_missing_yaml(tmp_path):
    with pytest.raises(InputError, match="not found"):
        load_config(Cfg, tmp_path / "nope.yaml")


def test_dump_dir_files(tmp_path):
    d = DumpDir(tmp_path / "run", Cfg(seed=2))
    d.log(step=1, loss=2.0)
    d.log(step=2, loss=1.5)
    d.write_results({"ok": True})
    assert "seed: 2" in (tmp_path / "run" / "config.yaml").read_text()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert json.loads((tmp_path / "run" / "results.json").read_text()) == {"ok": True}


def test_atomic_dir_replaces_keeps_and_cleans_up(tmp_path):
    out = tmp_path / "model"
    with atomic_dir(out) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".model.tmp-")
        (tmp / "a").write_text("1")
    assert [p.name for p in out.iterdir()] == ["a"] and out.stat().st_mode & 0o777 == 0o755
    with atomic_dir(out) as tmp:  # an old folder is replaced whole
        (tmp / "b").write_text("2")
    assert [p.name for p in out.iterdir()] == ["b"]
    with atomic_dir(out, keep_existing=True) as tmp:  # a cache entry someone else finished first wins
        (tmp / "c").write_text("3")
    assert [p.name for p in out.iterdir()] == ["b"]
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(out) as tmp:
            (tmp / "d").write_text("half")
            raise KeyboardInterrupt
    assert [p.name for p in out.iterdir()] == ["b"]
    assert [p.name for p in tmp_path.iterdir()] == ["model"], "no temporary folder left behind"


def test_atomic_file_replaces_whole_or_not_at_all(tmp_path):
    target = tmp_path / "sub" / "a.bin"
    with atomic_file(target) as tmp:
        assert tmp.parent == target.parent and tmp.name.endswith(".tmp") and not target.exists()
        tmp.write_bytes(b"first")
    assert target.read_bytes() == b"first" and (target.stat().st_mode & 0o777) == 0o644
    with pytest.raises(RuntimeError):
        with atomic_file(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("writer died")
    assert target.read_bytes() == b"first", "a failed write leaves the old file"
    assert [p.name for p in target.parent.iterdir()] == ["a.bin"], "no temporary file left behind"


def test_atomic_savefig_keeps_the_format_of_the_name(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    png = atomic_savefig(fig, tmp_path / "c.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    fig, ax = plt.subplots()
    assert atomic_savefig(fig, tmp_path / "c.svg").read_text().lstrip().startswith("<?xml")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.png", "c.svg"]
