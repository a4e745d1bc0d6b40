"""`tessera cite` (the sub-command object the root CLI registers) and its one-line errors."""

import json

import pytest
import typer
from attribution_fixtures import one_thread  # noqa: F401
from typer.testing import CliRunner

from tessera.attribution.cli import cite_command, print_statements
from tessera.errors import ContextTooLongError, InputError, TesseraError

CONTEXT = "The museum opened in 1921. Bananas are rich in potassium.\n\nThe secret code of the vault is 7391."


@pytest.fixture(scope="module")
def app():
    a = typer.Typer(pretty_exceptions_enable=False)
    a.command("cite")(cite_command)

    @a.command("noop")
    def noop():  # a second command keeps "cite" a sub-command, as in the root app
        pass

    return a


def invoke(app, *args):
    return CliRunner().invoke(app, ["cite", *args])


def test_cite_json_on_tiny_model(app, tiny_lm_dir, tmp_path):
    f = tmp_path / "ctx.txt"
    f.write_text(CONTEXT)
    r = invoke(app, "--context", str(f), "--question", "What is the code?", "--lm", str(tiny_lm_dir), "--best-of", "3",
               "--max-statements", "2", "--max-new-tokens", "96", "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    assert d["method"] == "best_of_3" and len(d["context"]) == 3 and d["statements"]
    for st in d["statements"]:
        assert st["spans"] and st["reward"] is not None
        for c in st["cited"]:
            assert CONTEXT[c["start"]:c["end"]] == c["text"] and c["doc_id"] == str(f)


def test_cite_text_output(app, tiny_lm_dir, tmp_path):
    f = tmp_path / "ctx.txt"
    f.write_text(CONTEXT)
    r = invoke(app, "--context", str(f), "--question", "What is the code?", "--lm", str(tiny_lm_dir), "--best-of", "0",
               "--max-new-tokens", "96")
    assert r.exit_code == 0, r.output
    assert "Answer" in r.output and "Citations" in r.output


@pytest.mark.parametrize("setup, args, error, needle", [
    ("missing", [], InputError, "not found"),
    ("empty", [], InputError, "is empty"),
    ("ok", ["--best-of", "-1"], InputError, "--best-of"),
    ("ok", ["--question", "   "], InputError, "question is empty"),
    ("ok", ["--question", "why " * 1500], ContextTooLongError, "context holds"),
])
def test_cite_bad_input_is_one_line(app, tiny_lm_dir, tmp_path, setup, args, error, needle):
    f = tmp_path / "ctx.txt"
    if setup == "empty":
        f.write_text(" \n")
    elif setup == "ok":
        f.write_text(CONTEXT)
    base = ["--context", str(f), "--lm", str(tiny_lm_dir)]
    if "--question" not in args:
        base += ["--question", "What is the code?"]
    r = invoke(app, *base, *args)
    assert isinstance(r.exception, error), (r.exception, r.output)
    assert isinstance(r.exception, TesseraError) and needle in str(r.exception)
    assert "\n" not in str(r.exception)


def test_print_statements_handles_empty(capsys):
    print_statements([])
