"""``tessera btx``: mix domain experts into a Mixtral checkpoint; routing analysis."""

from __future__ import annotations

import json
from pathlib import Path

import typer

btx_app = typer.Typer(help="Branch-Train-MiX: mix domain experts into a Mixtral MoE; routing analysis.", no_args_is_help=True)


def _prompts_for(paths: list[Path], include_seed: bool, variant: str, chunks: int, n: int) -> list[list[str]]:
    """Router prompts per MoE expert from each expert's ``expert.json`` domain (written by btx-branch)."""
    from tessera.btx.data import Domain, domain_texts
    from tessera.errors import InputError

    per_ffn = []
    for p in paths:
        info = p / "expert.json"
        if not info.is_file():
            raise InputError(f"{p} has no expert.json (not trained by btx-branch); use --router-init normal or zero")
        meta = json.loads(info.read_text())
        per_ffn.append([t[:2000] for t in domain_texts(Domain(meta["domain"], meta["source"]))[0][:n]])
    if include_seed:
        per_ffn.append([t for texts in per_ffn for t in texts[: max(1, n // len(per_ffn))]])
    if variant == "split":
        return [texts for texts in per_ffn for _ in range(chunks)]
    if variant == "blend":
        everything = [t for texts in per_ffn for t in texts]
        return [everything for _ in per_ffn]
    return per_ffn


@btx_app.command("mix")
def mix(
    experts: list[Path] = typer.Argument(..., help="Expert folders (Llama-family, branched from one seed), one per domain."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for the Mixtral checkpoint."),
    seed_model: str = typer.Option(None, "--seed-model", help="The seed (for --include-seed): a folder or 'default'."),
    include_seed: bool = typer.Option(False, "--include-seed", help="Add the seed's FFN as one more, generalist expert."),
    variant: str = typer.Option("moe", "--variant", help="moe (one expert per FFN) | split (FFN chunks) | blend (chunks of every FFN per expert)."),
    chunks: int = typer.Option(2, "--chunks", help="Chunks per FFN for --variant split."),
    top_k: int = typer.Option(2, "--top-k", help="Experts per token (BTX: 2); multiplied by --chunks for split."),
    router_init: str = typer.Option("normal", "--router-init", help="normal (N(0, 0.02)) | zero | hidden (mean hidden states of each expert's domain texts)."),
    routing: str = typer.Option("topk", "--routing", help="topk | switch | soft | sample (recorded in the config)."),
    prompts_per_expert: int = typer.Option(16, "--prompts-per-expert", help="Domain texts per expert for --router-init hidden."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out folder."),
    seed: int = typer.Option(0, "--seed", help="Random seed for the router."),
):
    """Write a Hugging Face MixtralForCausalLM checkpoint from BTX domain experts (FFNs -> experts, rest averaged)."""
    from tessera import ui
    from tessera.btx.mix import mix_experts

    prompts = _prompts_for(experts, include_seed, variant, chunks, prompts_per_expert) if router_init == "hidden" else None
    with ui.status(f"mixing {len(experts)} experts"):
        rep = mix_experts(experts, out, seed_model=seed_model, include_seed=include_seed, variant=variant, chunks=chunks,
                          experts_per_token=top_k, router_init=router_init, router_prompts=prompts, routing=routing,
                          overwrite=overwrite, seed=seed)
    ui.out.print(f"wrote {rep.out}: {rep.num_experts} experts, top-{rep.experts_per_token}, {rep.params / 1e6:.2f}M params, "
                 f"{rep.seconds:.2f} s")


@btx_app.command("route")
def route(
    model: Path = typer.Argument(..., help="A Mixtral folder (mixed or finetuned)."),
    domains: list[str] = typer.Option(["wiki:wikitext2", "mmlu:mmlu", "code:python-code"], "--domain", "-d", help="name:source, repeatable."),
    out: Path = typer.Option(Path("routing.png"), "--out", "-o", help="Heatmap PNG; the fractions go next to it as JSON."),
    blocks: int = typer.Option(8, "--blocks", help="Held-out blocks per domain."),
    seq_len: int = typer.Option(256, "--seq-len"),
):
    """Per-domain, per-layer routing fractions of a BTX model, as a heatmap PNG and JSON."""
    from transformers import AutoTokenizer

    from tessera import ui
    from tessera.btx.analysis import domain_routing, plot_routing_heatmap
    from tessera.btx.data import domain_blocks, parse_domains
    from tessera.btx.routing import load_btx_model
    from tessera.config import atomic_write_text
    from tessera.errors import InputError

    if not (model / "config.json").is_file():
        raise InputError(f"no model at {model}; pass a Mixtral folder written by `tessera btx mix`")
    ds = parse_domains(domains)
    m = load_btx_model(model)
    if m.config.model_type != "mixtral":
        raise InputError(f"{model} is a {m.config.model_type} model, not a Mixtral MoE; pass a `tessera btx mix` output")
    tok = AutoTokenizer.from_pretrained(model)
    held = {d.name: domain_blocks(d, tok, seq_len, 1, blocks)[1] for d in ds}
    with ui.status("routing held-out text"):
        fr = domain_routing(m, held)
    plot_routing_heatmap(fr, out)
    atomic_write_text(out.with_suffix(".json"), json.dumps(fr, indent=2))
    for name, rows in fr.items():
        mean = [sum(r[e] for r in rows) / len(rows) for e in range(len(rows[0]))]
        ui.out.print(f"{name}: " + " ".join(f"e{e}={v:.2f}" for e, v in enumerate(mean)))
    ui.out.print(f"heatmap: {out}")
