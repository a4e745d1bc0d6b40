"""Request and response bodies of the HTTP API (pydantic; they make the OpenAPI spec)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

# Static bounds of the spec; the server's config may set tighter ones (checked per request, 400).
QUESTION_MAX_CHARS = 20000
K_MAX = 50
NEW_TOKENS_MAX = 4096


class AskRequest(BaseModel):
    """A question for the corpus ``corpus`` (an id from ``GET /v1/corpora``; default: the server's first)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"question": "How do I give a function parameter a default value?", "corpus": "python-docs",
         "retriever": "bm25", "decode": "greedy", "cite": True, "k": 3}]})

    question: str = Field(min_length=1, max_length=QUESTION_MAX_CHARS, description="The question to answer.")
    corpus: str | None = Field(default=None, max_length=200, description="Corpus id; default: the server's default corpus.")
    retriever: Literal["bm25", "dense", "hybrid"] = Field(default="bm25", description="bm25 | dense | hybrid (reciprocal-rank fusion).")
    decode: Literal["greedy", "nest"] = Field(default="greedy", description="greedy (the LM alone) | nest (copy attributed spans from the sources).")
    cite: bool = Field(default=False, description="SelfCite: cite the source sentences that support each statement.")
    k: int = Field(default=3, ge=0, le=K_MAX, description="Passages to retrieve (the server may allow fewer).")
    max_new_tokens: int | None = Field(default=None, ge=1, le=NEW_TOKENS_MAX,
                                       description="Longest answer in tokens; default and cap from the server's config.")


class CitedSentence(BaseModel):
    id: int = Field(description="The sentence's number <C id> in the citation context.")
    text: str
    start: int = Field(description="Character offset of the sentence in its document.")
    end: int


class Citation(BaseModel):
    """The cited sentences of one source passage."""

    doc_id: str
    title: str
    sentence_ids: list[int]
    text: str = Field(description="The cited sentences, joined.")
    source: int | None = Field(default=None, description="Number [n] of the source passage they come from.")
    sentences: list[CitedSentence] = Field(default_factory=list)


class Statement(BaseModel):
    text: str
    citations: list[Citation]
    reward: float | None = Field(default=None, description="SelfCite reward prob_drop + prob_hold of the citation.")


class SpanSource(BaseModel):
    doc_id: str
    start: int = Field(description="Character offset in the document.")
    end: int
    passage_id: str | None = None
    source: int | None = Field(default=None, description="Number [n] of the source passage.")


class Span(BaseModel):
    """A run of the answer: copied from the corpus (``source``) or written by the model (``null``)."""

    text: str
    source: SpanSource | None


class SourceOut(BaseModel):
    number: int
    doc_id: str
    title: str
    passage_id: str
    score: float
    text: str
    start: int = Field(description="Character offset of the passage in its document.")
    end: int


class Timings(BaseModel):
    queue_s: float = 0.0
    retrieve_s: float = 0.0
    generate_s: float = 0.0
    time_to_first_token_s: float = 0.0
    cite_s: float | None = Field(default=None, description="SelfCite citation decoding and scoring (cite=true).")
    keys_s: float | None = Field(default=None, description="NEST: token keys of the retrieved passages (cached after first use).")
    total_s: float = 0.0


class AskResponse(BaseModel):
    question: str
    answer: str
    statements: list[Statement]
    spans: list[Span]
    sources: list[SourceOut]
    timings: Timings
    corpus: str
    retriever: str
    decode: str
    model: str
    prompt_tokens: int
    new_tokens: int
    attribution_ratio: float | None = Field(default=None, description="NEST: share of answer tokens copied from the sources.")


class ErrorBody(BaseModel):
    status: int
    code: str
    message: str = Field(description="One line that says what to do.")
    field: str | None = Field(default=None, description="The request field at fault, when one is.")


class ErrorResponse(BaseModel):
    error: ErrorBody


class CorpusOut(BaseModel):
    id: str
    name: str
    kind: Literal["config", "upload"]
    status: Literal["indexing", "ready", "failed"]
    documents: int | None = None
    passages: int | None = None
    dense: Literal["unavailable", "not built", "building", "ready", "failed"]
    job_id: str | None = None
    error: str | None = None


class CorpusList(BaseModel):
    default: str
    corpora: list[CorpusOut]


class JobOut(BaseModel):
    id: str
    kind: str
    status: Literal["queued", "running", "done", "failed"]
    progress: float = Field(ge=0, le=1)
    stage: str
    corpus_id: str | None = None
    error: str | None = None
    created_at: float
    finished_at: float | None = None


class UploadResponse(BaseModel):
    corpus: CorpusOut
    job: JobOut | None = None


class QueueOut(BaseModel):
    running: int
    waiting: int
    capacity: int


class FeatureOut(BaseModel):
    available: bool
    where: str
    note: str = ""


class BatchingOut(BaseModel):
    mode: Literal["batched", "concurrent", "serial"]
    max_batch: int
    workers: int
    decoding_rows: int | None = None
    reason: str = ""
    stats: dict | None = None  # the batch loop's counters (steps, mean decoding rows, tokens, served, cancelled)


class Health(BaseModel):
    status: Literal["ok"]
    version: str
    model: str
    engine: str = ""  # the text engine answers run on: llamacpp | tessera | hf | openai (--lm-url)
    encoder: str | None
    corpora: int
    queue: QueueOut
    batching: BatchingOut | None = None
    features: dict[str, FeatureOut] | None = None  # what the server can do and where it runs (--lm-url moves generation)
