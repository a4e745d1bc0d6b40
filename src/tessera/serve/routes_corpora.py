"""Corpora and their jobs: ``GET/POST /v1/corpora``, ``DELETE /v1/corpora/{id}``, ``GET /v1/jobs/{id}``."""

from __future__ import annotations

from fastapi import APIRouter, File, Form, Path as PathParam, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response

from tessera.serve.engine import ApiError
from tessera.serve.http_errors import error_responses
from tessera.serve.schemas import CorpusList, JobOut, UploadResponse
from tessera.serve.state import State

router = APIRouter()


@router.get("/v1/corpora", response_model=CorpusList, tags=["corpora"])
async def list_corpora(state: State) -> dict:
    """The corpora this server answers from (ids for ``/v1/ask``), with their indexing state."""
    return {"default": state.corpora.default_id, "corpora": state.corpora.list()}


@router.post("/v1/corpora", status_code=202, response_model=UploadResponse, responses=error_responses(400, 409, 413, 429),
             tags=["corpora"])
async def upload_corpus(state: State,
                        files: list[UploadFile] = File(..., description="JSONL (id, title, text per line) or .txt/.md/.rst files."),
                        name: str | None = Form(None, max_length=64, description="A name for the corpus.")) -> dict:
    """Upload documents as a new corpus; its index builds as a background job (poll ``/v1/jobs/{id}``)."""
    limit = state.config.max_upload_bytes
    data = []
    total = 0
    for f in files:
        chunk = await f.read(limit + 1 - total)
        total += len(chunk)
        if total > limit:
            raise ApiError(413, "upload_too_large", f"the files hold more than {limit} bytes; upload less", field="files")
        data.append((f.filename or "upload.txt", chunk))
    entry, job = await run_in_threadpool(state.corpora.upload, data, name)
    return {"corpus": entry.to_dict(), "job": job.to_dict() if job is not None else None}


@router.delete("/v1/corpora/{corpus_id}", status_code=204, responses=error_responses(400, 403, 404, 409), tags=["corpora"])
async def delete_corpus(state: State, corpus_id: str = PathParam(..., max_length=200)) -> Response:
    """Delete an uploaded corpus (its files; its cached index stays until the cache is cleared)."""
    state.corpora.delete(corpus_id)
    return Response(status_code=204)


@router.get("/v1/jobs/{job_id}", response_model=JobOut, responses=error_responses(400, 404), tags=["corpora"])
async def get_job(state: State, job_id: str = PathParam(..., max_length=64)) -> dict:
    """Progress of a background job (indexing an upload, building a dense index)."""
    job = state.jobs.get(job_id)
    if job is None:
        raise ApiError(404, "unknown_job", f"no job with id {job_id!r}; jobs are kept while the server runs", field="job_id")
    return job.to_dict()
