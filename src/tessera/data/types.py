"""Plain dataclasses shared by every reader."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Document:
    id: str
    title: str
    text: str

    @property
    def full_text(self) -> str:
        """Title and text joined the way retrievers index them."""
        return f"{self.title}\n{self.text}" if self.title else self.text


@dataclass(frozen=True)
class Query:
    id: str
    text: str
    # BRIGHT-style ids that must be removed from the ranking before scoring.
    excluded_ids: tuple[str, ...] = ()


@dataclass
class Collection:
    """An IR test collection: documents, queries and graded relevance judgements.

    ``qrels[qid][docid] = grade`` with higher = more relevant (pytrec_eval's
    convention); grades <= 0 count as non-relevant.
    """

    docs: list[Document]
    queries: list[Query] = field(default_factory=list)
    qrels: dict[str, dict[str, int]] = field(default_factory=dict)
    name: str = ""
    # Malformed rows a reader skipped (``skip_bad=True``); 0 when none were.
    n_skipped: int = 0

    def doc_by_id(self) -> dict[str, Document]:
        return {d.id: d for d in self.docs}
