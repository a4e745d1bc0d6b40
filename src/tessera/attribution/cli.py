"""``tessera cite``: answer a question from a text file with SelfCite sentence citations.

Register in ``tessera.cli`` with ``app.command("cite")(cite_command)``.  For
``tessera ask --cite``, :func:`tessera.attribution.selfcite.cite_answer` produces the
statements and :func:`print_statements` renders them with their source documents.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from tessera.errors import InputError


def read_context_file(path: Path) -> str:
    p = Path(path).expanduser()
    if not p.is_file():
        raise InputError(f"context file {p} not found; pass --context FILE with the text to cite from")
    try:
        text = p.read_text(encoding="utf-8-sig")  # a leading BOM is not part of the text
    except UnicodeDecodeError:
        raise InputError(f"context file {p} is not UTF-8 text; pass a plain-text file") from None
    if not text.strip():
        raise InputError(f"context file {p} is empty; pass a file with the text to cite from")
    return text


def cite_command(
    context: Path = typer.Option(..., "--context", "-c", help="Text file to answer from and cite (split into sentences <C1>..<Cn>)."),
    question: str = typer.Option(..., "--question", "-q", help="The question to answer."),
    best_of: int = typer.Option(10, "--best-of", "-n", help="Best-of-N citation sampling reranked by the SelfCite reward (paper: 10); 0 = direct prompting."),
    search: bool = typer.Option(False, "--search", help="Pick citations by the reward-only span search instead of sampling."),
    lm: str = typer.Option("default", "--lm", help="Language model: 'default' (embedded SmolLM2-135M-Instruct), a local folder or a cached hub id."),
    max_statements: int = typer.Option(4, "--max-statements", help="Most statements in the answer."),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", help="Longest answer, in tokens."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object (statements, citations, rewards, costs)."),
):
    """Answer a question from a text file; each statement cites the context sentences it rests on."""
    from tessera import ui
    from tessera.attribution.format import CitationContext
    from tessera.attribution.selfcite import cite
    from tessera.lm import LocalLM

    if best_of < 0:
        raise InputError(f"--best-of must be 0 or more, got {best_of}")
    if max_statements < 1:
        raise InputError(f"--max-statements must be at least 1, got {max_statements}")
    if not question or not question.strip():
        raise InputError("the question is empty; pass --question \"...\"")
    text = read_context_file(context)
    ctx = CitationContext.from_text(text, doc_id=str(context), title=Path(context).name)
    with ui.status(f"loading {lm}"):
        model = LocalLM.load(lm)
    with ui.status("answering and citing"):
        result = cite(model, ctx, question, best_of=best_of, search=search, max_new_tokens=max_new_tokens,
                      max_statements=max_statements)
    if as_json:
        d = result.to_dict()
        d["context"] = [s.to_dict() for s in ctx.sentences]
        d["model"] = model.name
        print(json.dumps(d, ensure_ascii=False, indent=2))
        return
    print_statements(result.statements)
    s = result.stats
    ui.info(f"[dim]{result.method}; {len(ctx)} context sentences; {s.get('seconds', 0):.1f} s[/dim]")


def print_statements(statements, show_reward: bool = True) -> None:
    """Render statements with their citations mapped to documents and character offsets."""
    from rich.table import Table

    from tessera import ui

    if not statements:
        ui.out.print("No statements: the model gave no answer.")
        return
    ui.out.print("[bold]Answer[/bold]")
    for k, st in enumerate(statements, 1):
        cite = st.cite_text or "[no citation]"
        reward = f"  (reward {st.reward:+.2f})" if show_reward and st.reward is not None else ""
        ui.out.print(f"{k}. {st.text} [cyan]{cite}[/cyan]{reward}")
    table = Table(title="Citations", title_justify="left")
    for col in ("statement", "sentence", "source", "document", "chars"):
        table.add_column(col, no_wrap=col != "document")
    table.add_column("text", overflow="fold")
    for k, st in enumerate(statements, 1):
        for c in st.cited:
            src = f"[{c.source}]" if c.source is not None else ""
            flat = " ".join(c.text.split())
            table.add_row(str(k), f"C{c.number}", src, c.title or c.doc_id, f"{c.start}-{c.end}",
                          flat if len(flat) <= 120 else flat[:117] + "...")
    ui.out.print(table)
