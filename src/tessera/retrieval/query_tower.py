"""Query-side fine-tuning: train the query encoder against a frozen document encoder.

The document side stays the base model, so every index already built with it stays valid and a
corpus is encoded once, however many query towers are trained against it.  A step encodes queries
only (tens of tokens, not hundreds), and the loss is InfoNCE over *every* candidate document at once
(the corpus plus the rows' own positives and negatives), not only over in-batch negatives:

    loss = -log exp(q·d+ / τ) / Σ_{d ∈ candidates, d not another positive of q} exp(q·d / τ)

with unit vectors and τ = 0.02 (ReasonIR's temperature).  A row's other positives and its source
document (``doc_id``, which a cropped span or a synthetic query came from) are masked out of the
denominator.  The result is one sentence-transformers folder with a ``Router``: ``encode_query``
runs the trained tower, ``encode_document`` the base model.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass, field

import numpy as np

from tessera.data.types import Document
from tessera.errors import InputError
from tessera.retrieval.dense_index import encode_corpus
from tessera.retrieval.train import REASONIR_TEMPERATURE, parse_row

log = logging.getLogger(__name__)


@dataclass
class QueryTowerSettings:
    epochs: int = 2
    steps: int = 0  # > 0: exactly this many steps (as many epochs as that takes), else ``epochs`` epochs
    batch_size: int = 32
    lr: float = 2e-5
    warmup_ratio: float = 0.1
    temperature: float = REASONIR_TEMPERATURE
    query_length: int = 64
    seed: int = 0


@dataclass
class Candidates:
    """The frozen document side: candidate texts, their embeddings and where each row's target sits."""

    texts: list[str]
    embeddings: np.ndarray
    ids: dict[str, int] = field(default_factory=dict)

    @classmethod
    def from_corpus(cls, doc_model, docs: list[Document], batch_size: int = 64, embeddings: np.ndarray | None = None):
        texts = [d.full_text for d in docs]
        if embeddings is None and not texts:
            embeddings = np.zeros((0, doc_model.get_embedding_dimension()), dtype=np.float32)
        elif embeddings is None:
            embeddings = encode_corpus(doc_model, texts, batch_size=batch_size, rank=0, world_size=1)
        if len(embeddings) != len(texts):
            raise InputError(f"{len(embeddings)} document embeddings for {len(texts)} documents; re-encode the corpus")
        return cls(texts, np.asarray(embeddings, dtype=np.float32), {d.id: i for i, d in enumerate(docs)})

    def extend(self, doc_model, texts: list[str], batch_size: int = 64) -> None:
        """Add texts that are not candidates yet (positives of cropped pairs, say), encoded by the frozen side."""
        known = set(self.texts)
        new = list(dict.fromkeys(t for t in texts if t not in known))
        if new:
            embs = encode_corpus(doc_model, new, batch_size=batch_size, rank=0, world_size=1)
            self.texts.extend(new)
            self.embeddings = np.concatenate([self.embeddings, np.asarray(embs, dtype=np.float32)])


@dataclass
class _Target:
    query: str
    index: int
    masked: tuple[int, ...]


def _parse(rows: list[dict]) -> list[tuple[list, object]]:
    """Each row's (query, positive, negatives) examples and its source document id; a bad row names itself."""
    out = []
    for n, row in enumerate(rows, 1):
        try:
            if not isinstance(row, dict):
                raise ValueError("a row must be a JSON object")
            out.append((parse_row(row, 0), _source_id(row)))
        except ValueError as e:
            raise InputError(f"training row {n}: {e}") from None
    return out


def _source_id(row: dict):
    """The document a row was written from: ``doc_id`` (``retrieval synth``) or ``source.doc_id`` (``retrieval pairs``)."""
    src = row.get("source")
    return row.get("doc_id", src.get("doc_id") if isinstance(src, dict) else None)


def _targets(parsed: list[tuple[list, object]], cands: Candidates) -> list[_Target]:
    """One target per (row, positive).  Masked out of its denominator: the copies of its own text, the query's
    other positives, the row's source document and every positive of rows written from that same document
    (two crops of one paper are not negatives of each other)."""
    where: dict[str, list[int]] = {}
    for i, t in enumerate(cands.texts):
        where.setdefault(t, []).append(i)
    by_query: dict[str, set[int]] = {}
    by_source: dict[int, set[int]] = {}
    pending = []
    for examples, source_id in parsed:
        source = cands.ids.get(str(source_id)) if source_id is not None else None
        source_set = set(where[cands.texts[source]]) if source is not None else set()
        for ex in examples:
            same = where[ex.pos]
            by_query.setdefault(ex.query, set()).update(set(same) | source_set)
            if source is not None:
                by_source.setdefault(source, set()).update(set(same) | source_set)
            pending.append((ex.query, same[0], source))
    return [_Target(q, i, tuple(sorted((by_query[q] | by_source.get(src, set())) - {i}))) for q, i, src in pending]


def _query_prompt(model) -> str | None:
    """The prompt ``encode_query`` prepends: the "query" prompt, else the default prompt."""
    prompts = getattr(model, "prompts", None) or {}
    if "query" in prompts:
        return prompts["query"] or None
    name = getattr(model, "default_prompt_name", None)
    return (prompts.get(name) or None) if name else None


def _loss(model, batch: list[_Target], doc_matrix, temperature: float):
    import torch
    import torch.nn.functional as F

    feats = model.preprocess([t.query for t in batch], prompt=_query_prompt(model))
    feats = {k: v.to(doc_matrix.device) if hasattr(v, "to") else v for k, v in feats.items()}
    q = F.normalize(model(feats)["sentence_embedding"], dim=-1)
    scores = q @ doc_matrix.T / temperature
    for r, t in enumerate(batch):
        if t.masked:
            scores[r, list(t.masked)] = float("-inf")
    target = torch.tensor([t.index for t in batch], device=scores.device)
    return F.cross_entropy(scores, target)


def train_query_tower(base, rows: list[dict], cands: Candidates, settings: QueryTowerSettings | None = None,
                      on_log=None, then: list[dict] | None = None):
    """Fine-tune a copy of ``base`` (a SentenceTransformer) as the query tower; returns (router model, stats).

    ``cands`` holds the frozen side's embeddings (:meth:`Candidates.from_corpus`); the rows' positives and
    negatives that are not candidates yet are added first.  ``then``: rows trained in a second pass after
    ``rows`` (a curriculum: synthetic rows first, then the task's own), with the same settings.
    """
    import torch

    s = settings or QueryTowerSettings()
    if not rows:
        raise InputError("no training rows; pass a ReasonIR-format JSONL with query/pos rows")
    passes = [_parse(r) for r in ([rows, then] if then else [rows])]
    cands.extend(base, [t for parsed in passes for examples, _ in parsed for ex in examples for t in (ex.pos, *ex.negs)])
    torch.manual_seed(s.seed)
    tower = copy.deepcopy(base)
    tower.max_seq_length = s.query_length
    tower.train()
    doc_matrix = torch.from_numpy(cands.embeddings).to(tower.device)
    gen = torch.Generator().manual_seed(s.seed)
    t0, runs = time.perf_counter(), []
    for parsed in passes:
        targets = _targets(parsed, cands)
        losses, per_epoch = _fit(tower, targets, doc_matrix, s, gen, on_log)
        window = max(1, len(losses) // 4)  # the mean of the first and the last quarter of the steps
        runs.append({"rows": len(parsed), "targets": len(targets), "steps": len(losses),
                     "epochs": round(len(losses) / per_epoch, 2),
                     "loss_first": round(float(np.mean(losses[:window])), 4),
                     "loss_last": round(float(np.mean(losses[-window:])), 4)})
    tower.eval()
    stats = {**runs[-1], "rows": sum(r["rows"] for r in runs), "targets": sum(r["targets"] for r in runs),
             "steps": sum(r["steps"] for r in runs), "loss_first": runs[0]["loss_first"],
             "candidates": len(cands.texts), "train_s": round(time.perf_counter() - t0, 2)}
    if len(runs) > 1:
        stats["passes"] = runs
    return asymmetric(tower, base), stats


def _fit(tower, targets: list[_Target], doc_matrix, s: QueryTowerSettings, gen, on_log) -> tuple[list[float], int]:
    """AdamW with linear warm-up and decay over ``s.steps`` steps or ``s.epochs`` epochs of shuffled batches."""
    import torch
    from transformers import get_linear_schedule_with_warmup

    steps_per_epoch = math.ceil(len(targets) / s.batch_size)
    total = s.steps if s.steps > 0 else max(1, s.epochs * steps_per_epoch)
    opt = torch.optim.AdamW([p for p in tower.parameters() if p.requires_grad], lr=s.lr)
    sched = get_linear_schedule_with_warmup(opt, int(s.warmup_ratio * total), total)
    losses = []
    for epoch in range(math.ceil(total / steps_per_epoch)):
        order = torch.randperm(len(targets), generator=gen).tolist()
        for b in range(0, len(order), s.batch_size):
            if len(losses) == total:
                break
            loss = _loss(tower, [targets[i] for i in order[b:b + s.batch_size]], doc_matrix, s.temperature)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
            if on_log and len(losses) % max(1, total // 10) == 0:
                on_log(step=len(losses), epoch=epoch, loss=round(losses[-1], 4))
    return losses, steps_per_epoch


def asymmetric(query_model, document_model):
    """One SentenceTransformer whose ``encode_query`` runs ``query_model`` and ``encode_document`` ``document_model``."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules import Router

    router = Router.for_query_document(query_modules=list(query_model.children()),
                                       document_modules=list(copy.deepcopy(document_model).children()))
    return SentenceTransformer(modules=[router], device=str(query_model.device), prompts=dict(query_model.prompts or {}),
                               default_prompt_name=query_model.default_prompt_name)
