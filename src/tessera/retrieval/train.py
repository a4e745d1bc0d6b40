"""Contrastive training of retrievers with sentence-transformers' trainer (ReasonIR, DRAMA).

The objective is InfoNCE over in-batch and hard negatives (ReasonIR's training
setup, PAPERS.md): each query is scored against its positive, its
``train_group_size - 1`` hard negatives and every other query's documents in the
batch, with cosine similarity divided by a temperature of 0.02 (sentence-transformers'
``scale = 1 / temperature = 50``).  Pieces, all from sentence-transformers:

- ``MultipleNegativesRankingLoss`` (query -> document InfoNCE), or its GradCache
  version ``CachedMultipleNegativesRankingLoss`` when ``mini_batch_size > 0``, so the
  effective batch does not depend on memory (ReasonIR trains with GradCache);
- ``MatryoshkaLoss`` around it for Matryoshka dimensions (DRAMA);
- ``gather_across_devices=True`` under torchrun: negatives from every rank (ReasonIR
  gathers in-batch negatives across GPUs);
- ``SentenceTransformerTrainer`` with a constant learning rate after 6% warm-up
  (ReasonIR: lr 2e-5, 1000 steps, effective batch 2048).
- LoRA (peft) for large backbones, merged back into the weights before saving so
  the result is a plain sentence-transformers folder.

Input rows are ReasonIR's format::

    {"query": [instruction, text], "pos": [[instruction, text], ...], "neg": [[instruction, text], ...]}

Each positive makes one training example (the first ``train_group_size - 1``
negatives go with it).  Instructions become prompt prefixes
(:func:`tessera.retrieval.encoder.format_prompt`) and are excluded from pooling,
which sentence-transformers does for one prompt per column and batch; so rows are
grouped by their prompts into one dataset each and every batch is drawn from one
group (``MultiDatasetBatchSamplers.PROPORTIONAL``).  In-batch negatives therefore
come from queries with the same instruction.
"""

from __future__ import annotations

import logging
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

from tessera.errors import DataFormatError, EmptyCorpusError, InputError

log = logging.getLogger(__name__)

REASONIR_TEMPERATURE = 0.02
REASONIR_MIN_NEG_RANK = 20


@dataclass(frozen=True)
class Example:
    """One (query, positive, negatives) group with each text's instruction."""

    query: str
    pos: str
    negs: tuple[str, ...]
    query_instruction: str = ""
    pos_instruction: str = ""
    neg_instructions: tuple[str, ...] = ()


@dataclass
class TrainingData:
    examples: list[Example]
    n_rows: int = 0
    n_skipped: int = 0
    sources: list[str] = field(default_factory=list)


def _pair(value, what: str) -> tuple[str, str]:
    """``[instruction, text]`` (or a bare string = no instruction) -> (instruction, text)."""
    if isinstance(value, str):
        return "", value
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, str) for v in value):
        return value[0], value[1]
    raise ValueError(f'{what} must be [instruction, text] (two strings), got {str(value)[:60]!r}')


def parse_row(row: dict, n_negatives: int) -> list[Example]:
    """One ReasonIR row -> one :class:`Example` per positive; ``ValueError`` says what is wrong."""
    if "query" not in row or "pos" not in row:
        raise ValueError('a row needs "query" and "pos" (and "neg" for hard negatives)')
    q_instr, q_text = _pair(row["query"], '"query"')
    if not q_text.strip():
        raise ValueError('"query" text is empty')
    pos = row["pos"]
    if not isinstance(pos, list) or not pos:
        raise ValueError('"pos" must be a non-empty list of [instruction, text]')
    positives = [_pair(p, '"pos" item') for p in pos]
    negs = row.get("neg") or []
    if not isinstance(negs, list):
        raise ValueError('"neg" must be a list of [instruction, text]')
    negatives = [_pair(n, '"neg" item') for n in negs]
    if len(negatives) < n_negatives:
        raise ValueError(f'"neg" has {len(negatives)} negatives, train_group_size needs {n_negatives}')
    negatives = negatives[:n_negatives]
    if any(not t.strip() for _, t in positives + negatives):
        raise ValueError("a positive or negative text is empty")
    return [
        Example(q_text, p_text, tuple(t for _, t in negatives), q_instr, p_instr, tuple(i for i, _ in negatives))
        for p_instr, p_text in positives
    ]


def read_training_rows(paths, n_negatives: int = 1, skip_bad: bool = False) -> TrainingData:
    """ReasonIR-format JSONL file(s) -> :class:`TrainingData`.

    A malformed row raises :class:`DataFormatError` naming ``file:line``; with
    ``skip_bad`` it is skipped and counted (``n_skipped``).
    """
    from tessera.data.jsonl import read_jsonl_numbered

    if isinstance(paths, (str, os.PathLike)):
        paths = [p for p in str(paths).split(",") if p]
    if not paths:
        raise InputError("no training data given; pass data=FILE.jsonl with ReasonIR rows")
    data = TrainingData([], sources=[str(p) for p in paths])
    for path in paths:
        rows, n_bad = read_jsonl_numbered(path, skip_bad)
        data.n_skipped += n_bad
        for lineno, row in rows:
            try:
                data.examples.extend(parse_row(row, n_negatives))
                data.n_rows += 1
            except ValueError as e:
                if not skip_bad:
                    raise DataFormatError(path, lineno, str(e), hint="fix the row or pass skip_bad=true") from None
                data.n_skipped += 1
    if not data.examples:
        raise EmptyCorpusError(f"no usable training rows in {', '.join(map(str, paths))}; each row needs a query, a positive and enough negatives")
    return data


def mine_bm25_negatives(
    collection,
    n_negatives: int = 1,
    min_rank: int = REASONIR_MIN_NEG_RANK,
    depth: int = 100,
    query_instruction: str = "",
    query_ids: list[str] | None = None,
    seed: int = 0,
) -> tuple[list[dict], dict]:
    """ReasonIR-format rows from a :class:`~tessera.data.types.Collection`, with BM25 hard negatives.

    For each judged query, BM25 (:class:`~tessera.retrieval.bm25.BM25Index`) ranks the
    collection's documents; the negatives are the first ``n_negatives``
    non-positive documents at rank ``>= min_rank`` (1-based).  ReasonIR takes the first
    non-positive at rank >= 20 (PAPERS.md) to stay clear of unjudged relevant
    documents near the top; that is the default.  When BM25 matches fewer documents,
    the lowest-ranked non-positive hits are used, then random non-positive documents
    (counted in the stats).  Returns ``(rows, stats)``.
    """
    from tessera.retrieval.bm25 import BM25Index

    if min_rank < 1:
        raise InputError(f"min_rank must be >= 1, got {min_rank}")
    docs = collection.docs
    if not docs:
        raise EmptyCorpusError(f"collection {collection.name} has no documents")
    index = {d.id: i for i, d in enumerate(docs)}
    texts = [d.full_text for d in docs]
    bm25 = BM25Index.build(texts)
    wanted = set(query_ids) if query_ids is not None else None
    queries = [q for q in collection.queries if wanted is None or q.id in wanted]
    rng = random.Random(seed)
    rows, stats = [], {"queries": 0, "no_positive_in_corpus": 0, "fallback_low_rank": 0, "fallback_random": 0, "neg_ranks": []}
    hits_all = bm25.search_many([q.text for q in queries], k=max(depth, min_rank + n_negatives))
    for q, hits in zip(queries, hits_all):
        positives = [d for d, g in collection.qrels.get(q.id, {}).items() if g > 0 and d in index]
        if not positives:
            stats["no_positive_in_corpus"] += 1
            continue
        pos_rows = {index[d] for d in positives}
        ranked = [(r + 1, i) for r, (i, _) in enumerate(hits) if i not in pos_rows]
        negs = [i for r, i in ranked if r >= min_rank][:n_negatives]
        stats["neg_ranks"].extend(r for r, i in ranked if i in negs)
        if len(negs) < n_negatives:
            low = [i for r, i in reversed(ranked) if i not in negs][: n_negatives - len(negs)]
            stats["fallback_low_rank"] += len(low)
            negs += low
        while len(negs) < n_negatives:
            i = rng.randrange(len(docs))
            if i not in pos_rows and i not in negs:
                negs.append(i)
                stats["fallback_random"] += 1
        rows.append({
            "id": q.id,
            "query": [query_instruction, q.text],
            "pos": [["", texts[index[d]]] for d in positives],
            "neg": [["", texts[i]] for i in negs],
        })
        stats["queries"] += 1
    ranks = stats.pop("neg_ranks")
    stats["median_neg_rank"] = sorted(ranks)[len(ranks) // 2] if ranks else None
    return rows, stats


def examples_from_rows(rows: list[dict], n_negatives: int = 1) -> list[Example]:
    """In-memory ReasonIR rows -> examples (``ValueError`` on a bad row, naming its index)."""
    out = []
    for i, row in enumerate(rows):
        try:
            out.extend(parse_row(row, n_negatives))
        except ValueError as e:
            raise InputError(f"training row {i}: {e}") from None
    return out


def build_datasets(examples: list[Example], prompt_style: str):
    """Examples -> ``(train_dataset, prompts)`` for the trainer.

    Columns are ``query, positive, negative_1..n`` (sentence-transformers' n-tuple
    layout for ``MultipleNegativesRankingLoss``).  Examples are grouped by their
    formatted prompts; one group gives a ``Dataset`` with ``{column: prompt}``, several
    give a ``DatasetDict`` with ``{group: {column: prompt}}``.
    """
    from datasets import Dataset, DatasetDict

    from tessera.retrieval.encoder import format_prompt

    if not examples:
        raise EmptyCorpusError("no training examples")
    n_neg = len(examples[0].negs)
    groups: dict[tuple, list[Example]] = {}
    for ex in examples:
        if len(ex.negs) != n_neg:
            raise InputError(f"every example needs {n_neg} negatives; one has {len(ex.negs)}")
        key = (format_prompt(prompt_style, ex.query_instruction, "query"), format_prompt(prompt_style, ex.pos_instruction, "document"),
               tuple(format_prompt(prompt_style, i, "document") for i in (ex.neg_instructions or ("",) * n_neg)))
        groups.setdefault(key, []).append(ex)
    cols = ["query", "positive"] + [f"negative_{j + 1}" for j in range(n_neg)]
    datasets, prompts = {}, {}
    for g, (key, exs) in enumerate(groups.items()):
        data = {"query": [e.query for e in exs], "positive": [e.pos for e in exs]}
        for j in range(n_neg):
            data[f"negative_{j + 1}"] = [e.negs[j] for e in exs]
        name = f"group{g}"
        datasets[name] = Dataset.from_dict(data)
        prompts[name] = dict(zip(cols, [key[0], key[1], *key[2]]))
    if len(datasets) == 1:
        return datasets["group0"], prompts["group0"]
    return DatasetDict(datasets), prompts


def make_loss(model, temperature: float = REASONIR_TEMPERATURE, mini_batch_size: int = 0, matryoshka_dims=None,
              gather_across_devices: bool = False):
    """InfoNCE with temperature ``temperature`` (scale ``1/temperature``); GradCache when ``mini_batch_size > 0``."""
    from sentence_transformers.sentence_transformer import losses

    if temperature <= 0:
        raise InputError(f"temperature must be > 0, got {temperature}")
    scale = 1.0 / temperature
    if mini_batch_size and mini_batch_size > 0:
        loss = losses.CachedMultipleNegativesRankingLoss(model, scale=scale, mini_batch_size=int(mini_batch_size),
                                                         gather_across_devices=gather_across_devices)
    else:
        loss = losses.MultipleNegativesRankingLoss(model, scale=scale, gather_across_devices=gather_across_devices)
    if matryoshka_dims:
        from tessera.retrieval.encoder import check_matryoshka_dims

        dims = check_matryoshka_dims(matryoshka_dims, model.get_embedding_dimension())
        loss = losses.MatryoshkaLoss(model, loss, matryoshka_dims=dims)
    return loss


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def add_lora(model, r: int = 16, alpha: int = 32, dropout: float = 0.05, target_modules=None):
    """Wrap the backbone with LoRA adapters (peft); only adapter weights train."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise InputError("LoRA needs peft; run `pip install peft` or set lora=false") from None
    backbone = model[0].model
    names = {n.rsplit(".", 1)[-1] for n, _ in backbone.named_modules()}
    targets = [t for t in (target_modules or LORA_TARGETS) if t in names] or ["query", "key", "value", "dense"]
    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, bias="none")
    model[0].model = get_peft_model(backbone, cfg)
    return model


def merge_lora(model):
    """Fold LoRA adapters back into the backbone weights (a plain model again)."""
    backbone = model[0].model
    if hasattr(backbone, "merge_and_unload"):
        model[0].model = backbone.merge_and_unload()
    return model


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _log_callback(log_fn):
    """A trainer callback forwarding its logs (loss, learning rate) to ``log_fn(step=..., ...)`` on rank 0."""
    from transformers import TrainerCallback

    class LogCallback(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and state.is_world_process_zero and "loss" in logs:
                log_fn(step=state.global_step, **{k: float(v) for k, v in logs.items() if isinstance(v, (int, float))})

    return LogCallback()


def _check_training_size(train_dataset, steps: int, batch_size: int) -> int:
    """Validate steps and batch size against the dataset (or its instruction groups); the number of rows."""
    if steps < 1:
        raise InputError(f"steps must be >= 1, got {steps}")
    if batch_size < 2:
        raise InputError(f"batch_size must be >= 2 for in-batch negatives, got {batch_size}")
    sizes = [len(d) for d in train_dataset.values()] if hasattr(train_dataset, "values") else [len(train_dataset)]
    n_rows = sum(sizes)
    if max(sizes) < batch_size:
        raise InputError(f"{n_rows} training examples cannot fill one batch of {batch_size}; lower batch_size or add rows")
    small = [n for n in sizes if n < batch_size]
    if small:  # every batch comes from one instruction group; a group smaller than a batch is never drawn
        log.warning("%d instruction group(s) with %d examples in all are smaller than batch_size=%d and are not trained on",
                    len(small), sum(small), batch_size)
    return n_rows


def _training_args(output_dir, prompts, *, steps: int, batch_size: int, lr: float, warmup_ratio: float,
                   weight_decay: float, seed: int, logging_steps: int, quiet: bool, dataloader_workers: int):
    """``SentenceTransformerTrainingArguments``: constant lr after warm-up, no duplicates in a batch, no checkpoints."""
    import torch
    from sentence_transformers import SentenceTransformerTrainingArguments
    from sentence_transformers.base.sampler import BatchSamplers, MultiDatasetBatchSamplers

    on_cpu = not torch.cuda.is_available()
    return SentenceTransformerTrainingArguments(
        output_dir=str(output_dir),
        max_steps=int(steps),
        per_device_train_batch_size=int(batch_size),
        learning_rate=float(lr),
        warmup_steps=float(warmup_ratio),
        lr_scheduler_type="constant_with_warmup",
        weight_decay=float(weight_decay),
        logging_steps=max(1, int(logging_steps)),
        logging_first_step=True,
        save_strategy="no",
        report_to="none",
        seed=int(seed),
        data_seed=int(seed),
        batch_sampler=BatchSamplers.NO_DUPLICATES,
        multi_dataset_batch_sampler=MultiDatasetBatchSamplers.PROPORTIONAL,
        dataloader_drop_last=True,
        dataloader_num_workers=int(dataloader_workers),
        prompts=prompts,
        use_cpu=on_cpu,
        ddp_backend="gloo" if on_cpu and int(os.environ.get("WORLD_SIZE", "1")) > 1 else None,
        bf16=not on_cpu and torch.cuda.is_bf16_supported(),
        disable_tqdm=quiet,
        ddp_find_unused_parameters=False,
    )


def train_retriever(
    model,
    train_dataset,
    prompts,
    loss,
    output_dir: str | Path,
    steps: int = 1000,
    batch_size: int = 16,
    lr: float = 2e-5,
    warmup_ratio: float = 0.06,
    weight_decay: float = 0.0,
    seed: int = 0,
    logging_steps: int = 10,
    log_fn=None,
    quiet: bool = False,
    dataloader_workers: int = 0,
) -> dict:
    """Run ``SentenceTransformerTrainer`` and return ``{"steps", "train_s", "loss_first", "loss_last", ...}``.

    Defaults are ReasonIR's (lr 2e-5 constant after 6% warm-up, 1000 steps); its
    effective batch of 2048 queries is scaled down to 16 for CPU.  Batches never
    hold the same text twice (``BatchSamplers.NO_DUPLICATES``), so a duplicated
    positive cannot become its own in-batch negative; the last incomplete batch is
    dropped, which keeps DDP ranks in step.  ``output_dir`` holds the trainer's scratch files only
    (no checkpoints are written); save the model yourself.
    """
    from sentence_transformers import SentenceTransformerTrainer

    n_rows = _check_training_size(train_dataset, steps, batch_size)
    history: list[dict] = []

    def record(**row):
        history.append(row)
        if log_fn is not None:
            log_fn(**row)

    args = _training_args(output_dir, prompts, steps=steps, batch_size=batch_size, lr=lr, warmup_ratio=warmup_ratio,
                          weight_decay=weight_decay, seed=seed, logging_steps=logging_steps, quiet=quiet,
                          dataloader_workers=dataloader_workers)
    trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=train_dataset, loss=loss,
                                         callbacks=[_log_callback(record)])
    if quiet:  # no per-log dict printing either
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)
    t0 = time.perf_counter()
    out = trainer.train()
    train_s = time.perf_counter() - t0
    losses = [h["loss"] for h in history if "loss" in h]
    return {
        "steps": int(out.global_step),
        "train_s": round(train_s, 2),
        "loss_first": losses[0] if losses else None,
        "loss_last": losses[-1] if losses else None,
        "train_loss_mean": float(out.training_loss),
        "examples": n_rows,
        "history": history,
    }
