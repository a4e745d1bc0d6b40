"""``tessera nest generate``: NEST decoding with attributed output.

``nest_app`` is a typer sub-app (registered by ``tessera.cli`` as ``tessera nest``);
``python -m tessera.attribution.nest_cli generate ...`` runs it on its own.
"""

from __future__ import annotations

import json

import typer

from tessera import ui

nest_app = typer.Typer(help="NEST: nearest-neighbour speculative decoding that copies corpus spans and cites them.",
                       no_args_is_help=True)


@nest_app.callback()
def _group() -> None:
    """NEST: nearest-neighbour speculative decoding that copies corpus spans and cites them."""


@nest_app.command()
def generate(
    prompt: str = typer.Argument(..., help="Text to continue (or, with --chat, a user message)."),
    corpus: str = typer.Option("python-docs", "--corpus", "-c", help="'python-docs' or a file/folder of .txt/.md/.rst/.jsonl documents."),
    lm: str = typer.Option("default", "--lm", help="Language model: 'default' (embedded SmolLM2-135M-Instruct), a local folder or a cached hub id."),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", help="Most tokens to generate."),
    chat: bool = typer.Option(False, "--chat", help="Wrap the prompt as a user turn in the model's chat template (default: plain continuation)."),
    query: str = typer.Option(None, "--query", help="Passage retrieval query (default: the prompt)."),
    passage_k: int = typer.Option(None, "--passage-k", help="Passages in the datastore (default 8 on CPU; the paper uses 40)."),
    token_k: int = typer.Option(None, "--token-k", help="Token neighbours per step (default 1024)."),
    window: int = typer.Option(None, "--window", help="Longest proposed span in tokens (default 64)."),
    gamma: float = typer.Option(None, "--gamma", help="Relaxed acceptance: keep x iff p_M(x) >= gamma * max p_M (default 5e-4; >1 accepts nothing)."),
    alpha: float = typer.Option(None, "--alpha", help="Confidence offset: lambda = sigmoid((RRC - alpha) / tau) (default 0.3)."),
    tau: float = typer.Option(None, "--tau", help="Confidence scale (default 0.1)."),
    delta: float = typer.Option(None, "--delta", help="Propose a span when lambda < delta (default 0.5)."),
    retriever: str = typer.Option(None, "--retriever", "-r", help="bm25 | dense | hybrid (default bm25)."),
    encoder: str = typer.Option(None, "--encoder", "-e", help="Encoder for dense/hybrid retrieval (default: the embedded all-MiniLM-L6-v2)."),
    no_key_cache: bool = typer.Option(False, "--no-key-cache", help="Recompute token keys instead of reading/writing $TESSERA_HOME/nest."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object (text, spans, tokens with sources, stats)."),
):
    """Continue PROMPT with NEST: copied spans are shown with their [doc id]."""
    from tessera.attribution.nest import config_from_options, nest_generate

    cfg = config_from_options(passage_k=passage_k, token_k=token_k, window=window, gamma=gamma, alpha=alpha, tau=tau,
                              delta=delta, retriever=retriever, encoder=encoder, cache_keys=not no_key_cache)
    with ui.status("NEST decoding"):
        result = nest_generate(prompt, corpus=corpus, lm=lm, config=cfg, max_new_tokens=max_new_tokens, chat=chat, query=query)
    if as_json:
        print(json.dumps(result.to_dict(), ensure_ascii=False, indent=2))
        return
    print_result(result)


def print_result(result) -> None:
    """Attributed text (copied spans highlighted, ``[doc id]`` after each), a table of cited documents, the stats."""
    from rich.table import Table
    from rich.text import Text

    text = Text()
    for span in result.spans:
        if span.copied:
            body = span.text.rstrip()
            text.append(body, style="bold cyan")
            text.append(f" [{span.doc_id}]", style="dim")
            text.append(span.text[len(body):])
        else:
            text.append(span.text)
    ui.out.print(text)
    ui.out.print()
    cited: dict[str, dict] = {}
    titles = {p.doc_id: p.title for p in result.passages}
    for span in result.spans:
        if span.copied:
            row = cited.setdefault(span.doc_id, {"tokens": 0, "ranges": []})
            row["tokens"] += span.n_tokens
            row["ranges"].append(f"{span.start}-{span.end}")
    if cited:
        table = Table(title="Copied from", title_justify="left")
        for col in ("doc id", "title", "tokens", "characters"):
            table.add_column(col, overflow="fold")
        for doc_id, row in cited.items():
            table.add_row(doc_id, titles.get(doc_id, ""), str(row["tokens"]), ", ".join(row["ranges"]))
        ui.out.print(table)
    elif not result.passages:
        ui.out.print("No passage matched the prompt: the output is the model's alone.")
    s = result.stats
    spans = s.accepted_span_lengths
    ui.out.print(Text(
        f"{s.new_tokens} tokens, {s.copied_tokens} copied (attribution {100 * s.attribution_ratio:.0f}%), "
        f"{s.tokens_per_s:.1f} tokens/s, forward passes after the prompt: {s.forward_passes}, accepted spans {spans}; "
        f"datastore {s.datastore_tokens} tokens from {len(result.passages)} passages "
        f"(keys: {s.keys_cached} cached, {s.keys_built} built, {s.keys_s:.1f} s)", style="dim"))


def main() -> None:
    ui.run_app(nest_app)


if __name__ == "__main__":
    main()
