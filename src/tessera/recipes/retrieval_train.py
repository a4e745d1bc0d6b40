"""Recipe ``retrieval-train``: contrastive training of a retriever (ReasonIR and DRAMA training, PAPERS.md).

    tessera run retrieval-train data=train.jsonl backbone=default out=runs/my-retriever
    torchrun --nproc_per_node 2 -m tessera.cli run retrieval-train data=train.jsonl ...
    tessera run retrieval-train data=train.jsonl query_only=true corpus=scifact   # keep the document index

``query_only=true`` trains only the query encoder against the frozen document encoder
(:mod:`tessera.retrieval.query_tower`): InfoNCE over every document of ``corpus`` (and the
rows' own positives and negatives) at once; an index built with the backbone stays valid.

Top to bottom: read ReasonIR-format rows -> build the retriever (bidirectional,
mean-pooled, instruction-prefixed for decoders) -> optionally wrap it with LoRA ->
InfoNCE over in-batch and hard negatives at temperature 0.02 (GradCache when
``mini_batch_size > 0``, Matryoshka when ``matryoshka_dims`` is set, negatives gathered
across ranks under torchrun) -> sentence-transformers' trainer -> save the model in
sentence-transformers format.  The dump dir gets ``config.yaml``, ``metrics.jsonl``
(loss per logging step), ``results.json`` and, unless ``out`` says otherwise, the
model under ``model/``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from tessera.retrieval.encoder import DEFAULT_INSTRUCTION


@dataclass
class Config:
    data: str = ""  # ReasonIR-format JSONL (comma-separate several files)
    backbone: str = "default-encoder"  # default-encoder (MiniLM), default (SmolLM2), or a model folder
    out: str = ""  # model folder; default <dump_dir>/model
    dump_dir: str = "runs/retrieval-train"
    seed: int = 0
    # retriever
    pooling: str = "mean"  # mean (ReasonIR) | last
    bidirectional: bool = True  # decoders: ReasonIR and DRAMA encode bidirectionally
    prompt_style: str = ""  # reasonir | drama | none; "" = reasonir for decoders, none for encoders
    instruction: str = DEFAULT_INSTRUCTION  # the query instruction saved in the model's prompts
    max_seq_length: int = 256  # ReasonIR: 2048 (scaled down for CPU)
    # objective
    train_group_size: int = 2  # 1 positive + n hard negatives (ReasonIR: one hard negative)
    temperature: float = 0.02  # ReasonIR; sentence-transformers scale = 1 / temperature
    mini_batch_size: int = 0  # > 0: GradCache (CachedMultipleNegativesRankingLoss) with this chunk size
    matryoshka_dims: list[int] = field(default_factory=list)  # e.g. [576, 256, 128] (DRAMA)
    gather_across_devices: bool = True  # under torchrun: in-batch negatives from every rank
    # optimisation (ReasonIR: lr 2e-5 constant, 6% warm-up, 1000 steps, batch 2048; batch scaled down for CPU)
    steps: int = 1000
    batch_size: int = 16
    lr: float = 2e-5
    warmup_ratio: float = 0.06
    weight_decay: float = 0.0
    logging_steps: int = 10
    # LoRA for large backbones (peft); merged into the weights before saving
    lora: bool = False
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    skip_bad: bool = False
    # query-side fine-tuning: the document encoder stays the backbone
    query_only: bool = False
    corpus: str = ""  # query_only: candidate documents (a collection name or folder); "" = the rows' own texts
    query_max_seq_length: int = 64


def main(cfg: Config) -> Path:
    import torch

    from tessera import ui
    from tessera.config import DumpDir
    from tessera.errors import InputError
    from tessera.retrieval import train as T
    from tessera.retrieval.encoder import build_retriever, resolve_backbone

    if not cfg.data:
        raise InputError("no training data; pass data=FILE.jsonl with rows {\"query\": [instr, text], \"pos\": [[instr, text]], \"neg\": [...]}")
    if cfg.train_group_size < 1:
        raise InputError(f"train_group_size must be >= 1 (1 positive + n negatives), got {cfg.train_group_size}")
    torch.manual_seed(cfg.seed)
    main_rank = T.is_main_process()

    # 1. data: ReasonIR rows -> (query, positive, negatives) examples, grouped by prompt
    n_negatives = 0 if cfg.query_only else cfg.train_group_size - 1  # query_only: every candidate is a negative
    data = T.read_training_rows(cfg.data, n_negatives=n_negatives, skip_bad=cfg.skip_bad)
    _, kind = resolve_backbone(cfg.backbone)
    style = cfg.prompt_style or ("reasonir" if kind == "decoder" else "none")
    if cfg.query_only:  # its own loop over raw rows: no trainer datasets
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise InputError("query_only=true runs on one process (its steps are small); start it without torchrun")
        return _query_only(cfg, data, style)
    train_dataset, prompts = T.build_datasets(data.examples, style)

    # 2. the retriever
    model = build_retriever(cfg.backbone, pooling=cfg.pooling, bidirectional=cfg.bidirectional, prompt_style=style,
                            instruction=cfg.instruction, matryoshka_dims=cfg.matryoshka_dims or None,
                            max_seq_length=cfg.max_seq_length)
    if cfg.lora:
        T.add_lora(model, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout)

    # 3. InfoNCE (+ GradCache, + Matryoshka, + cross-rank negatives)
    loss = T.make_loss(model, temperature=cfg.temperature, mini_batch_size=cfg.mini_batch_size,
                       matryoshka_dims=cfg.matryoshka_dims or None, gather_across_devices=cfg.gather_across_devices)

    # 4. train (the dump dir is created only now, so bad input leaves nothing behind)
    dump = DumpDir(cfg.dump_dir, cfg) if main_rank else None
    if main_rank:  # the trainer scratch of a run killed mid-training
        for stale in Path(cfg.dump_dir).glob(".trainer-*"):
            shutil.rmtree(stale, ignore_errors=True)
    scratch = Path(tempfile.mkdtemp(prefix=".trainer-", dir=Path(cfg.dump_dir))) if main_rank else Path(tempfile.mkdtemp())
    try:
        stats = T.train_retriever(model, train_dataset, prompts, loss, scratch, steps=cfg.steps, batch_size=cfg.batch_size,
                                  lr=cfg.lr, warmup_ratio=cfg.warmup_ratio, weight_decay=cfg.weight_decay, seed=cfg.seed,
                                  logging_steps=cfg.logging_steps, log_fn=dump.log if dump else None, quiet=ui.is_quiet())
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if cfg.lora:
        T.merge_lora(model)

    # 5. save (rank 0), atomically
    out = Path(cfg.out) if cfg.out else Path(cfg.dump_dir) / "model"
    if main_rank:
        save_model(model, out)
        history = stats.pop("history")
        dump.write_results({
            "model": str(out),
            "backbone": cfg.backbone,
            "prompt_style": style,
            "prompts": model.prompts,
            "rows": data.n_rows,
            "examples": len(data.examples),
            "skipped_rows": data.n_skipped,
            "groups": len(prompts) if isinstance(next(iter(prompts.values()), ""), dict) else 1,
            "world_size": int(os.environ.get("WORLD_SIZE", "1")),
            "effective_batch": cfg.batch_size * int(os.environ.get("WORLD_SIZE", "1")),
            "embedding_dim": model.get_embedding_dimension(),
            **stats,
            "logged_steps": len(history),
        })
        ui.info(f"saved retriever to {out} (loss {stats['loss_first']} -> {stats['loss_last']} in {stats['steps']} steps)")
    return Path(cfg.dump_dir)


def _query_only(cfg: Config, data, style: str) -> Path:
    """Train the query tower on the rows against the frozen backbone's document embeddings; save the pair."""
    from tessera import ui
    from tessera.config import DumpDir
    from tessera.data.jsonl import read_jsonl
    from tessera.retrieval.encoder import build_retriever
    from tessera.retrieval.query_tower import Candidates, QueryTowerSettings, train_query_tower
    from tessera.retrieval.search import open_collection
    from tessera.retrieval.train import parse_row

    rows = [r for path in data.sources for r in read_jsonl(path, skip_bad=cfg.skip_bad) if _usable(r, parse_row)]
    docs = open_collection(cfg.corpus).docs if cfg.corpus else []
    base = build_retriever(cfg.backbone, pooling=cfg.pooling, bidirectional=cfg.bidirectional, prompt_style=style,
                           instruction=cfg.instruction, max_seq_length=cfg.max_seq_length)
    cands = Candidates.from_corpus(base, docs)
    dump = DumpDir(cfg.dump_dir, cfg)
    model, stats = train_query_tower(base, rows, cands, QueryTowerSettings(
        steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr, warmup_ratio=cfg.warmup_ratio,
        temperature=cfg.temperature, query_length=cfg.query_max_seq_length, seed=cfg.seed), on_log=dump.log)
    out = Path(cfg.out) if cfg.out else Path(cfg.dump_dir) / "model"
    save_model(model, out)
    dump.write_results({"model": str(out), "backbone": cfg.backbone, "query_only": True, "corpus": cfg.corpus,
                        "skipped_rows": data.n_skipped, **stats})
    ui.info(f"saved query tower + frozen document encoder to {out} "
            f"(loss {stats['loss_first']} -> {stats['loss_last']} in {stats['steps']} steps)")
    return Path(cfg.dump_dir)


def _usable(row: dict, parse_row) -> bool:
    try:
        parse_row(row, 0)
        return True
    except ValueError:
        return False


def save_model(model, out: Path) -> None:
    """``model.save`` into a temporary sibling folder, then rename into place."""
    from tessera.config import atomic_dir
    from tessera.errors import InputError

    out = Path(out)
    if out.exists() and any(out.iterdir()) and not (out / "modules.json").is_file():
        raise InputError(f"{out} exists and is not a sentence-transformers model folder; pass a new folder as out=")
    with atomic_dir(out) as tmp:
        model.save(str(tmp))
