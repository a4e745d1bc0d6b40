"""PIT training schedules, numbered as in the paper (Jiang et al., 2024, Figure 4 and Table 2).

Each schedule is a sequence of stages; each stage trains on the union of the named sources:

=====  ==========================================  ==============================================
 no.   name                                        stages
=====  ==========================================  ==============================================
 1     continued pre-training                      test docs
 2     standard instruction-tuning                 train + test docs -> train QA
 4     mix all                                     train + test docs + train QA
 5     QA, then test docs                          train QA -> test docs
 6     QA, then train docs, then test docs         train QA -> train docs -> test docs
 7     PIT (pre-instruction-tuning)                train QA + train docs -> test docs
 8     PIT++                                       train QA -> train QA + train docs -> test docs
=====  ==========================================  ==============================================

(3 is the paper's open-book reference, not a training schedule.)  A stage with documents but
no QA source also keeps ``keep_qa`` train QA pairs (64 in the paper) so the QA format is not
forgotten.  Test people's QA pairs are never in any stage.

A *plan* unrolls a schedule for one data set: each stage's list of ``(kind, id)`` items, every
source repeated for its number of epochs (documents ``doc_epochs``, QA ``qa_epochs``; a
fractional epoch adds a seeded random part of the source), and the whole stage shuffled with a
seeded RNG - the paper notes that unshuffled training destroys the effect.  With a token budget
every stage's epochs are scaled by one factor so all schedules train on (about) the same
number of tokens.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field

from tessera.errors import InputError

DOCS_TRAIN, DOCS_TEST, QA_TRAIN = "docs_train", "docs_test", "qa_train"
SOURCES = (DOCS_TRAIN, DOCS_TEST, QA_TRAIN)

SCHEDULES: dict[int, tuple[str, tuple[tuple[str, ...], ...]]] = {
    1: ("continued pre-training", ((DOCS_TEST,),)),
    2: ("standard instruction-tuning", ((DOCS_TRAIN, DOCS_TEST), (QA_TRAIN,))),
    4: ("mix all", ((DOCS_TRAIN, DOCS_TEST, QA_TRAIN),)),
    5: ("QA, then test docs", ((QA_TRAIN,), (DOCS_TEST,))),
    6: ("QA, then train docs, then test docs", ((QA_TRAIN,), (DOCS_TRAIN,), (DOCS_TEST,))),
    7: ("PIT", ((QA_TRAIN, DOCS_TRAIN), (DOCS_TEST,))),
    8: ("PIT++", ((QA_TRAIN,), (QA_TRAIN, DOCS_TRAIN), (DOCS_TEST,))),
}

PAPER_KEEP_QA = 64  # QA pairs mixed into document-only stages (PIT, section 2)


def check_schedule(number: int) -> None:
    if number not in SCHEDULES:
        known = ", ".join(f"{k} ({v[0]})" for k, v in SCHEDULES.items())
        raise InputError(f"unknown PIT schedule {number}; known schedules: {known}")


@dataclass
class Stage:
    sources: tuple[str, ...]
    kept_qa: tuple[str, ...]  # train QA ids kept in a document-only stage
    epochs: dict[str, float]  # per source (and "kept_qa")
    lr: float
    items: list[tuple[str, str]] = field(default_factory=list)  # ("doc"|"qa", id), training order
    tokens: int = 0

    @property
    def name(self) -> str:
        return "+".join(self.sources) + ("+kept_qa" if self.kept_qa else "")

    def counts(self) -> Counter:
        return Counter(kind for kind, _ in self.items)


@dataclass
class Plan:
    schedule: int
    name: str
    stages: list[Stage]

    @property
    def tokens(self) -> int:
        return sum(s.tokens for s in self.stages)

    def describe(self) -> dict:
        return {"schedule": self.schedule, "name": self.name, "tokens": self.tokens, "stages": [
            {"name": s.name, "sources": list(s.sources), "epochs": s.epochs, "lr": s.lr, "kept_qa": len(s.kept_qa),
             "examples": len(s.items), "docs": s.counts()["doc"], "qa": s.counts()["qa"], "tokens": s.tokens}
            for s in self.stages]}


def _repeat(ids: list[str], epochs: float, rng: random.Random) -> list[str]:
    """``ids`` ``floor(epochs)`` times plus a seeded random ``frac(epochs)`` part of them."""
    whole = int(epochs)
    out = ids * whole
    extra = round((epochs - whole) * len(ids))
    if extra:
        out += rng.sample(ids, extra)
    return out


def kept_qa_ids(kset, keep_qa: int, seed: int) -> tuple[str, ...]:
    """The train QA pairs kept in document stages (the same ones for every schedule of a seed)."""
    train = [q.id for q in kset.train_qa]
    return tuple(sorted(random.Random(f"keep-qa:{seed}").sample(train, min(max(keep_qa, 0), len(train)))))


def build_plan(kset, schedule: int, *, doc_epochs: float = 10.0, qa_epochs: float = 3.0, doc_lr: float = 3e-5,
               qa_lr: float = 5e-6, keep_qa: int = PAPER_KEEP_QA, seed: int = 0,
               lengths: dict[tuple[str, str], int] | None = None, budget_tokens: int | None = None) -> Plan:
    """Unroll ``schedule`` on ``kset`` (a :class:`~tessera.data.knowledge.KnowledgeSet`).

    Paper values (PIT section 2, Llama-2 7B): documents 10 epochs at lr 3e-5, QA at lr 5e-6
    (1 epoch for standard instruction-tuning, 3 for PIT; one ``qa_epochs`` here, so that
    schedules differ only in order and grouping).  A stage with documents uses ``doc_lr``, a
    QA-only stage ``qa_lr``.  ``lengths`` maps ``(kind, id)`` to a token count; with
    ``budget_tokens`` all epochs are scaled so that the plan trains on about that many tokens.
    """
    check_schedule(schedule)
    name, stage_sources = SCHEDULES[schedule]
    if doc_epochs <= 0 or qa_epochs <= 0:
        raise InputError(f"doc_epochs and qa_epochs must be positive, got {doc_epochs} and {qa_epochs}")
    pool = {DOCS_TRAIN: [("doc", d.id) for d in kset.train_docs], DOCS_TEST: [("doc", d.id) for d in kset.test_docs],
            QA_TRAIN: [("qa", q.id) for q in kset.train_qa]}
    for src, items in pool.items():
        if not items and any(src in s for s in stage_sources):
            raise InputError(f"schedule {schedule} needs {src} but the data has none; add documents/QA on both sides of the split")
    kept = kept_qa_ids(kset, keep_qa, seed)

    def unroll(scale: float) -> list[Stage]:
        stages = []
        for k, sources in enumerate(stage_sources):
            rng = random.Random(f"plan:{seed}:{schedule}:{k}")
            has_docs = any(s != QA_TRAIN for s in sources)
            keep = kept if has_docs and QA_TRAIN not in sources else ()
            epochs = {s: (doc_epochs if s != QA_TRAIN else qa_epochs) * scale for s in sources}
            items: list[tuple[str, str]] = []
            for s in sources:
                items += _repeat(pool[s], epochs[s], rng)
            if keep:
                epochs["kept_qa"] = doc_epochs * scale
                items += _repeat([("qa", q) for q in keep], epochs["kept_qa"], rng)
            rng.shuffle(items)
            tokens = sum(lengths[i] for i in items) if lengths is not None else 0
            stages.append(Stage(sources=sources, kept_qa=keep, epochs=epochs, lr=doc_lr if has_docs else qa_lr,
                                items=items, tokens=tokens))
        return stages

    stages = unroll(1.0)
    if budget_tokens:
        if lengths is None:
            raise InputError("a token budget needs the examples' token lengths")
        base = sum(s.tokens for s in stages)
        stages = unroll(budget_tokens / base)
    return Plan(schedule=schedule, name=name, stages=stages)
