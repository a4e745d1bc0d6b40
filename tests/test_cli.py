"""CLI: help, doctor, models list, and every user error -> one line, exit code 2."""

import pytest

from tessera_testing import run_cli


def assert_one_line_error(r, *needles):
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = [line for line in r.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def test_help_and_version():
    r = run_cli("--help")
    assert r.returncode == 0 and "ask" in r.stdout and "doctor" in r.stdout and "models" in r.stdout
    assert run_cli("--version").stdout.startswith("tessera ")


def test_models_list():
    r = run_cli("models", "list")
    assert r.returncode == 0 and "default-encoder" in r.stdout and "SmolLM2" in r.stdout


@pytest.mark.integration
def test_doctor_loads_both_models(embedded_lm_dir):
    r = run_cli("doctor")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count(" ok ") >= 2 or r.stdout.count("ok") >= 2
    assert "torch" in r.stdout and "shared data" in r.stdout


def test_missing_corpus(tmp_path, tiny_lm_dir):
    r = run_cli("ask", "q?", "--corpus", str(tmp_path / "nope"), "--lm", str(tiny_lm_dir))
    assert_one_line_error(r, "not found")


def test_empty_corpus(tmp_path, tiny_lm_dir):
    (tmp_path / "c").mkdir()
    r = run_cli("ask", "q?", "--corpus", str(tmp_path / "c"), "--lm", str(tiny_lm_dir))
    assert_one_line_error(r, "no documents")


def test_non_utf8_corpus(tmp_path, tiny_lm_dir):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "latin1.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    r = run_cli("ask", "q?", "--corpus", str(tmp_path / "c"), "--lm", str(tiny_lm_dir))
    assert_one_line_error(r, "latin1.txt", "UTF-8")


def test_malformed_jsonl_corpus_names_line(tmp_path, tiny_lm_dir):
    f = tmp_path / "docs.jsonl"
    f.write_text('{"id": "a", "text": "fine"}\n{"id": "b", "text": \n')
    r = run_cli("ask", "q?", "--corpus", str(f), "--lm", str(tiny_lm_dir))
    assert_one_line_error(r, "docs.jsonl:2")


@pytest.mark.parametrize("spec", ["nobody/no-such-model-xyz", "./missing-model-folder"])
def test_unknown_model(spec, tmp_path):
    (tmp_path / "a.txt").write_text("some text about things")
    r = run_cli("ask", "q?", "--corpus", str(tmp_path), "--lm", spec)
    assert_one_line_error(r, "default")


def test_question_longer_than_context(tmp_path, tiny_lm_dir):
    (tmp_path / "a.txt").write_text("some text about things")
    r = run_cli("ask", "why " * 1500, "--corpus", str(tmp_path), "--lm", str(tiny_lm_dir))
    assert_one_line_error(r, "tokens", "context")


def test_unknown_recipe_and_bad_k(tmp_path, tiny_lm_dir):
    assert_one_line_error(run_cli("run", "no-such-recipe"), "unknown recipe")
    (tmp_path / "a.txt").write_text("some text")
    assert_one_line_error(run_cli("ask", "q?", "--corpus", str(tmp_path), "--lm", str(tiny_lm_dir), "--k", "-1"), "--k")
