"""Knowledge-learning data: documents, QA pairs linked to them, and a train/test split of entities.

PIT (Jiang et al., 2024, section 2) splits a corpus of *new* documents into train and test
documents: the model trains on all documents, on QA pairs of the train documents only, and is
evaluated on the QA pairs of the test documents.  Here a document belongs to an *entity*
(a person of the biography testbed, or a user document); several documents may describe one
entity (augmentation), and QA pairs name the entity through ``doc_id``.

User data: a documents JSONL (``{"id", "text"}``, optional ``"split": "train"|"test"``) and a
QA JSONL (``{"doc_id", "question", "answer"}``, optional ``"id"`` and ``"attribute"``), linked
by document id; a bad row raises :class:`~tessera.errors.DataFormatError` naming ``file:line``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

from tessera.errors import DataFormatError, EmptyCorpusError, InputError


@dataclass(frozen=True)
class KnowledgeDoc:
    id: str
    text: str
    entity: str  # the person / document the text is about; QA pairs link to it
    # (attribute, start, end) character spans of the attribute values in ``text`` (synthetic biographies);
    # the storage gate asks the model to complete the text up to each span
    spans: tuple[tuple[str, int, int], ...] = ()


@dataclass(frozen=True)
class KnowledgeQA:
    id: str
    doc_id: str  # the entity the question is about
    question: str
    answer: str
    attribute: str = ""


@dataclass
class KnowledgeSet:
    """Documents + QA pairs + which entities are *test* (their QA is never trained on)."""

    documents: list[KnowledgeDoc]
    qa: list[KnowledgeQA]
    test_entities: frozenset[str]
    meta: dict = field(default_factory=dict)

    @property
    def train_docs(self) -> list[KnowledgeDoc]:
        return [d for d in self.documents if d.entity not in self.test_entities]

    @property
    def test_docs(self) -> list[KnowledgeDoc]:
        return [d for d in self.documents if d.entity in self.test_entities]

    @property
    def train_qa(self) -> list[KnowledgeQA]:
        return [q for q in self.qa if q.doc_id not in self.test_entities]

    @property
    def test_qa(self) -> list[KnowledgeQA]:
        return [q for q in self.qa if q.doc_id in self.test_entities]

    def documents_of(self, entity: str) -> list[KnowledgeDoc]:
        return [d for d in self.documents if d.entity == entity]

    def summary(self) -> dict:
        return {"documents": len(self.documents), "train_docs": len(self.train_docs), "test_docs": len(self.test_docs),
                "qa": len(self.qa), "train_qa": len(self.train_qa), "test_qa": len(self.test_qa),
                "entities": len({d.entity for d in self.documents}), "test_entities": len(self.test_entities)}


def split_entities(entities: list[str], test_fraction: float, seed: int) -> frozenset[str]:
    """A seeded random ``test_fraction`` of the entities (at least one on each side)."""
    if not 0.0 < test_fraction < 1.0:
        raise InputError(f"test_fraction must be between 0 and 1 (exclusive), got {test_fraction}")
    ents = sorted(set(entities))
    if len(ents) < 2:
        raise InputError("need at least two documents to split into train and test; add documents")
    n_test = min(max(1, round(len(ents) * test_fraction)), len(ents) - 1)
    return frozenset(random.Random(seed).sample(ents, n_test))


def _field(path, line: int, row: dict, name: str) -> str:
    value = row.get(name)
    if not isinstance(value, (str, int)) or isinstance(value, bool) or not str(value).strip():
        raise DataFormatError(path, line, f"missing or empty '{name}'", hint=f"every row needs a non-empty \"{name}\"")
    return str(value).strip() if name != "text" else str(value)


def read_knowledge(docs_path: str | Path, qa_path: str | Path, test_fraction: float = 0.5, seed: int = 0) -> KnowledgeSet:
    """Documents JSONL + QA JSONL -> :class:`KnowledgeSet`.

    The split comes from the documents' ``"split"`` fields when every row has one, else a seeded
    random ``test_fraction`` of the documents is held out.  Errors name ``file:line``: a row
    without ``id``/``text`` (docs) or ``doc_id``/``question``/``answer`` (QA), a duplicate
    document id, a QA pair whose ``doc_id`` is not a document, an unknown split value.
    """
    from tessera.data.jsonl import read_jsonl_numbered

    docs_rows, _ = read_jsonl_numbered(docs_path)
    qa_rows, _ = read_jsonl_numbered(qa_path)
    if not docs_rows:
        raise EmptyCorpusError(f"{docs_path} has no documents; add one JSON object per line with \"id\" and \"text\"")
    if not qa_rows:
        raise EmptyCorpusError(f"{qa_path} has no QA pairs; add rows with \"doc_id\", \"question\" and \"answer\"")
    docs: list[KnowledgeDoc] = []
    splits: dict[str, str] = {}
    seen: dict[str, int] = {}
    for line, row in docs_rows:
        did = _field(docs_path, line, row, "id")
        text = _field(docs_path, line, row, "text")
        if did in seen:
            raise DataFormatError(docs_path, line, f"duplicate document id '{did}' (first on line {seen[did]})",
                                  hint="give every document a unique id")
        seen[did] = line
        if "split" in row:
            if row["split"] not in ("train", "test"):
                raise DataFormatError(docs_path, line, f"split must be 'train' or 'test', got {row['split']!r}",
                                      hint="use \"split\": \"train\" or \"test\", or leave it out everywhere")
            splits[did] = row["split"]
        docs.append(KnowledgeDoc(id=did, text=text, entity=did))
    qa: list[KnowledgeQA] = []
    qa_ids: set[str] = set()
    for line, row in qa_rows:
        doc_id = _field(qa_path, line, row, "doc_id")
        if doc_id not in seen:
            raise DataFormatError(qa_path, line, f"doc_id '{doc_id}' is not a document id in {docs_path}",
                                  hint="link every QA pair to the \"id\" of a document")
        qid = str(row.get("id") or f"{doc_id}#q{line}")
        if qid in qa_ids:
            raise DataFormatError(qa_path, line, f"duplicate QA id '{qid}'", hint="give every QA pair a unique id")
        qa_ids.add(qid)
        qa.append(KnowledgeQA(id=qid, doc_id=doc_id, question=_field(qa_path, line, row, "question"),
                              answer=_field(qa_path, line, row, "answer"), attribute=str(row.get("attribute", "") or "")))
    if splits and len(splits) == len(docs):
        test = frozenset(d for d, s in splits.items() if s == "test")
        if not test or len(test) == len(docs):
            raise InputError(f"{docs_path}: the 'split' fields put every document on one side; mark some 'train' and some 'test'")
    elif splits:
        raise InputError(f"{docs_path}: only {len(splits)} of {len(docs)} documents have a 'split'; give every row one or none")
    else:
        test = split_entities([d.id for d in docs], test_fraction, seed)
    kset = KnowledgeSet(documents=docs, qa=qa, test_entities=test, meta={"source": "user", "documents": str(docs_path), "qa": str(qa_path)})
    if not kset.test_qa:
        raise InputError(f"no QA pair belongs to a test document in {qa_path}; the evaluation needs questions about test documents")
    if not kset.train_qa:
        raise InputError(f"no QA pair belongs to a train document in {qa_path}; instruction-tuning needs questions about train documents")
    return kset
