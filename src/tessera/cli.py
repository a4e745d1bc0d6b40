"""Command line: ``tessera ask``, ``tessera doctor``, ``tessera models list``, ``tessera checkpoint``; one sub-app per area.

Every error a user can cause prints one line (``error: ...`` saying what to do)
and exits with code 2.
"""

from __future__ import annotations

import json
import sys

from tessera import __version__, ui

ui.quiet_libraries()

import typer  # noqa: E402

from tessera.errors import TesseraError  # noqa: E402

app = typer.Typer(
    name="tessera",
    help="Retrieval, attribution, knowledge learning and sparse LMs: nine research systems on real models, CPU-first.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
models_app = typer.Typer(help="Embedded default models and model specs.", no_args_is_help=True)
app.add_typer(models_app, name="models")
checkpoint_app = typer.Typer(help="Training checkpoints (safetensors + JSON folders; no pickle).", no_args_is_help=True)
app.add_typer(checkpoint_app, name="checkpoint")
from tessera.attribution.cli import cite_command  # noqa: E402
from tessera.attribution.nest_cli import nest_app  # noqa: E402
from tessera.btx.cli import btx_app  # noqa: E402
from tessera.retrieval.cli import retrieval_app  # noqa: E402
from tessera.rag import rag_app  # noqa: E402
from tessera.serve.cli import serve_command  # noqa: E402

app.add_typer(retrieval_app, name="retrieval")
app.add_typer(rag_app, name="rag")
app.add_typer(nest_app, name="nest")
app.add_typer(btx_app, name="btx")
app.command("cite")(cite_command)
app.command("serve")(serve_command)


def _version(value: bool):
    if value:
        print(f"tessera {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars or status messages."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
):
    ui.set_quiet(quiet)


@app.command()
def ask(
    question: str = typer.Argument(..., help="The question to answer."),
    corpus: str = typer.Option("python-docs", "--corpus", "-c", help="'python-docs' (Python's documentation topics) or a file/folder of .txt/.md/.rst/.jsonl documents."),
    lm: str = typer.Option("default", "--lm", help="Language model: 'default' (embedded SmolLM2-135M-Instruct), gguf:PATH, a local folder or a cached hub id."),
    engine: str = typer.Option("auto", "--engine", envvar="TESSERA_ENGINE", help="auto (llama.cpp for GGUF models when llama-cpp-python is installed, else tessera) | llamacpp | tessera | hf."),
    lm_url: str = typer.Option(None, "--lm-url", help="OpenAI-compatible server (vLLM, llama.cpp) that serves --lm, e.g. http://127.0.0.1:8080/v1; --lm then names its local copy (tokenizer)."),
    k: int = typer.Option(3, "--k", "-k", help="Number of passages to retrieve."),
    retriever: str = typer.Option("bm25", "--retriever", "-r", help="bm25 | dense | hybrid (reciprocal-rank fusion of both)."),
    encoder: str = typer.Option("default-encoder", "--encoder", "-e", help="Encoder for dense/hybrid: 'default-encoder' (embedded all-MiniLM-L6-v2), a trained retriever's name (tessera models), a folder or a cached hub id."),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", help="Longest answer, in tokens."),
    decode: str = typer.Option("greedy", "--decode", help="greedy (the LM alone) | nest (NEST: copy attributed spans from the sources)."),
    cite: bool = typer.Option(False, "--cite", help="SelfCite: cite the source sentences that support each statement of the answer."),
    best_of: int = typer.Option(0, "--best-of", help="With --cite: rerank N sampled citations per statement by the SelfCite reward (0 = constrained greedy)."),
    temperature: float = typer.Option(0.0, "--temperature", help="0 = greedy decoding."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object (answer, sources, timings) instead of streaming text."),
):
    """Answer a question from a document collection, with numbered sources."""
    from tessera.ask import ask as run_ask

    streamed = []

    def on_token(piece: str) -> None:
        if not streamed:
            ui.out.print("[bold]Answer[/bold]")
        streamed.append(piece)
        sys.stdout.write(piece)
        sys.stdout.flush()

    from tessera.lm.local import engine_choice

    engine_choice(lm, engine)  # a bad --engine fails before the corpus is indexed
    result = run_ask(question, corpus=corpus, lm=lm, engine=engine, lm_url=lm_url, k=k, max_new_tokens=max_new_tokens, temperature=temperature,
                     on_token=None if as_json else on_token, retriever=retriever, encoder=encoder,
                     decode=decode, cite=cite, best_of=best_of)
    if as_json:
        print(json.dumps(result.to_dict(), ensure_ascii=False, indent=2))
        return
    sys.stdout.write("\n\n")
    if result.nest is not None:
        ui.out.print(f"[bold]Attributed[/bold] ({result.nest.attribution_ratio:.0%} of tokens copied from the sources)")
        ui.out.print(result.nest.render(), markup=False)
        sys.stdout.write("\n")
    if result.statements:
        from tessera.attribution.cli import print_statements

        print_statements(result.statements)
        sys.stdout.write("\n")
    _print_sources(result)
    s = result.stats
    ui.info(f"[dim]{s.new_tokens} tokens, {s.tokens_per_s:.1f} tokens/s, first token after {s.time_to_first_token_s:.2f} s; "
            f"retrieval {result.timings['retrieve_s'] * 1000:.1f} ms[/dim]")


def _print_sources(result) -> None:
    from rich.table import Table

    table = Table(title="Sources", title_justify="left", show_lines=False, expand=False)
    table.add_column("#", justify="right")
    table.add_column("doc id")
    table.add_column("title")
    table.add_column("snippet", overflow="fold")
    for s in result.sources:
        table.add_row(str(s.number), s.doc_id, s.title, s.snippet)
    if not result.sources:
        ui.out.print("Sources: none retrieved (no passage matched the question's terms).")
    else:
        ui.out.print(table)


@app.command()
def doctor():
    """Versions, device, embedded models, cache folder and shared data: what works here."""
    import importlib.metadata as md
    import platform

    from rich.table import Table

    from tessera import hub
    from tessera.data.paths import shared_data_dir

    table = Table(show_header=False, box=None)
    table.add_row("tessera", __version__)
    table.add_row("python", platform.python_version())
    for pkg in ("torch", "transformers", "sentence-transformers", "bm25s", "faiss-cpu", "pytrec-eval-terrier", "llama-cpp-python"):
        try:
            table.add_row(pkg, md.version(pkg))
        except md.PackageNotFoundError:
            optional = pkg == "llama-cpp-python"
            table.add_row(pkg, "[yellow]not installed (optional: the llama.cpp engine)[/yellow]" if optional else "[red]not installed[/red]")
    import torch

    dev = hub.default_device()
    table.add_row("device", f"{dev} ({torch.cuda.get_device_name(0)})" if dev.type == "cuda" else f"{dev} ({torch.get_num_threads()} threads)")
    table.add_row("cache ($TESSERA_HOME)", str(hub.tessera_home()))
    data = shared_data_dir()
    table.add_row("shared data", str(data) if data else "[yellow]not found (tests and benchmarks that need it skip)[/yellow]")
    from tessera.lm.local import engine_choice

    try:
        eng, why = engine_choice("default")
        table.add_row("LM engine", f"{eng} ({why}; --engine or TESSERA_ENGINE picks another)")
    except TesseraError as e:
        table.add_row("LM engine", f"[red]{e}[/red]")
    for spec, loader in (("default", _check_lm), ("default-encoder", _check_encoder)):
        try:
            with ui.status(f"loading {spec}"):
                table.add_row(f"model {spec}", f"[green]ok[/green] {loader(spec)}")
        except TesseraError as e:
            table.add_row(f"model {spec}", f"[red]{e}[/red]")
    ui.out.print(table)


def _check_lm(spec: str) -> str:
    import torch

    from tessera import hub

    loaded = hub.load_lm(spec)
    with torch.inference_mode():
        loaded.model(torch.tensor([[1, 2, 3]], device=loaded.model.device))
    n = sum(p.numel() for p in loaded.model.parameters())
    return f"{type(loaded.model).__name__}, {n / 1e6:.0f}M params, {loaded.path}"


def _check_encoder(spec: str) -> str:
    from tessera import hub

    enc = hub.load_encoder(spec)
    dim = enc.encode(["hello"]).shape[1]
    return f"{dim}-d embeddings, {hub.resolve_encoder(spec)}"


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def run(
    ctx: typer.Context,
    recipe: str = typer.Argument(..., help="Recipe name; an unknown name lists the known ones."),
):
    """Run a recipe: ``tessera run RECIPE [config.yaml] key=value ...``; writes a dump dir."""
    from tessera.recipes import run_recipe

    args = list(ctx.args)
    config_path = args.pop(0) if args and "=" not in args[0] and args[0].endswith((".yaml", ".yml")) else None
    dump = run_recipe(recipe, config_path, args)
    from tessera.config import is_main_process

    if is_main_process():  # under torchrun: one line, from rank 0
        ui.out.print(f"done: {dump}")


@models_app.command("list")
def models_list():
    """The embedded default models and whether they are ready."""
    from rich.table import Table

    from tessera import hub

    table = Table()
    for col in ("spec", "role", "model"):
        table.add_column(col, no_wrap=True)
    for col in ("status", "source"):
        table.add_column(col, overflow="fold")
    for row in hub.list_models():
        table.add_row(row["spec"], row["role"], row["model"], row["status"], row["source"])
    ui.out.print(table)
    ui.out.print("Any local model folder or cached hub id works wherever a spec is asked for.")


@checkpoint_app.command("convert")
def checkpoint_convert(
    src: str = typer.Argument(..., help="An old pickle checkpoint (checkpoint.pt)."),
    out: str = typer.Option("", "--out", help="The checkpoint folder to write (default: SRC without .pt)."),
):
    """Convert an old ``checkpoint.pt`` to a checkpoint folder, reading tensors only (torch's weights-only unpickler)."""
    from tessera.train.checkpoint import convert_legacy

    ui.out.print(f"wrote {convert_legacy(src, out or None)}")


@checkpoint_app.command("show")
def checkpoint_show(path: str = typer.Argument(..., help="A checkpoint folder.")):
    """Print a checkpoint's loop state, extra fields and tensor counts as JSON."""
    from tessera.train.checkpoint import read_checkpoint

    ck = read_checkpoint(path)
    loop = {k: v for k, v in ck["state"].items() if k != "step_times"}
    print(json.dumps({"loop": loop, "extra": ck["extra"], "model_tensors": len(ck["model"]),
                      "model_parameters": sum(int(v.numel()) for v in ck["model"].values()),
                      "optimizer_entries": len(ck["optimizer"]["state"]) if ck["optimizer"] else 0}, indent=1))


def main() -> None:
    ui.run_app(app)


if __name__ == "__main__":
    main()
