"""The FastAPI app of ``tessera serve``: API routes, error bodies, server-sent events and the page.

Every error is ``{"error": {"status", "code", "message", "field"}}``: ``400`` for bad
input (``field`` names the request field), ``404`` unknown ids, ``409`` a corpus or
dense index still being built, ``413`` too large, ``429`` (with ``Retry-After``)
when the model's queue is full, ``504`` past the request timeout.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, File, HTTPException, Form, Path as PathParam, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from tessera import __version__
from tessera.errors import ContextTooLongError, InputError, TesseraError
from tessera.serve.config import ServeConfig
from tessera.serve.corpora import CorpusEntry, CorpusRegistry
from tessera.serve.engine import ApiError, AskWorker, Cancelled, JobManager, RequestTimeout, Task
from tessera.serve.schemas import AskRequest, AskResponse, CorpusList, ErrorResponse, Health, JobOut, UploadResponse

log = logging.getLogger("tessera.serve")
STATIC = Path(__file__).parent / "static"
ASK_BODY_LIMIT = 64 * 1024
SSE_PING_S = 15.0
SSE_EVENTS = ("queued", "sources", "token", "answer", "result", "error")

_HTTP_CODES = {400: "bad_request", 403: "forbidden", 404: "not_found", 405: "method_not_allowed", 409: "conflict",
               413: "too_large", 415: "unsupported_media_type", 429: "too_many_requests", 500: "internal_error",
               503: "unavailable", 504: "timeout"}


def _errors(*codes: int) -> dict:
    return {c: {"model": ErrorResponse, "description": _HTTP_CODES.get(c, "error").replace("_", " ")} for c in codes}


@dataclass
class ServerState:
    config: ServeConfig
    lm: object
    corpora: CorpusRegistry
    jobs: JobManager
    worker: AskWorker


def _sse(event: str, data) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n".encode()


class _TooLarge(HTTPException):
    """Raised while reading a body past its limit (an HTTPException, so FastAPI's body parsing passes it on)."""

    def __init__(self):
        super().__init__(413, "the request body is too large for this server's limits")


class BodyLimit:
    """Pure ASGI middleware: request bodies over the path's limit get a JSON 413, before or while they are read."""

    def __init__(self, app, default: int, limits: dict[str, int]):
        self.app, self.default, self.limits = app, default, limits

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        limit = self.limits.get(scope["path"].rstrip("/"), self.default)
        field = "files" if scope["path"].rstrip("/") in self.limits else None
        length = next((v for k, v in scope.get("headers", ()) if k == b"content-length"), None)
        too_large = JSONResponse(ApiError(413, "too_large", f"the request body is larger than this server takes here "
                                          f"({limit} bytes)", field=field).body(), status_code=413)
        if length is not None and length.isdigit() and int(length) > limit:
            return await too_large(scope, receive, send)
        seen, started = 0, False

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise _TooLarge()
            return message

        async def tracked_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracked_send)
        except _TooLarge:
            if not started:
                await too_large(scope, receive, send)


def error_payload(exc: BaseException) -> ApiError:
    """Any exception a request can end with, as an :class:`ApiError`."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, RequestTimeout):
        return ApiError(504, "timeout", str(exc))
    if isinstance(exc, ContextTooLongError):
        return ApiError(400, "too_long", str(exc), field="question")
    if isinstance(exc, TesseraError):
        return ApiError(400, "bad_input", str(exc))
    log.exception("request failed", exc_info=exc)
    return ApiError(500, "internal_error", f"the server failed ({type(exc).__name__}); see its log")


def create_app(config: ServeConfig | None = None, lm=None) -> FastAPI:
    """The app over one loaded model (``lm``: a :class:`~tessera.lm.LocalLM`, default: load ``config.lm``).

    Configured corpora are opened now (BM25 indexes build or load from the cache);
    dense indexes and uploads are indexed by background jobs.
    """
    from tessera.lm.local import LocalLM

    config = config or ServeConfig()
    jobs = JobManager()
    corpora = CorpusRegistry(config, jobs)
    for spec in config.corpora:  # corpora first: a bad --corpus fails before the model loads
        corpora.add_configured(spec)
    model = lm if lm is not None else LocalLM.load(config.lm, engine=config.engine, url=config.lm_url)
    corpora.restore_uploads()
    worker = AskWorker(config.queue_size, config.request_timeout_s)
    state = ServerState(config, model, corpora, jobs, worker)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        worker.close()
        jobs.close()

    app = FastAPI(
        title="tessera",
        version=__version__,
        summary="Grounded answers with SelfCite citations and NEST attributed spans.",
        description="Ask a question of a corpus; the answer comes with its sources, sentence-level citations per "
                    "statement (SelfCite) and, with decode=nest, the spans copied from the corpus (NEST). "
                    "Errors are {\"error\": {status, code, message, field}}.",
        lifespan=lifespan,
    )
    app.state.tessera = state
    app.add_middleware(BodyLimit, default=ASK_BODY_LIMIT, limits={"/v1/corpora": config.max_upload_bytes + 256 * 1024})

    # -- errors ----------------------------------------------------------------------
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        errs = exc.errors()
        first = errs[0] if errs else {"loc": (), "msg": "invalid request"}
        loc = [str(x) for x in first.get("loc", ()) if x not in ("body", "query", "path", "header")]
        if first.get("type") == "json_invalid":
            loc = []
        field = ".".join(loc) if loc else "body"
        msg = first.get("msg", "invalid value")
        if first.get("type") == "extra_forbidden":
            msg = "unknown field (models and paths come only from the server's config)"
        more = f" (and {len(errs) - 1} more)" if len(errs) > 1 else ""
        text = f"{field}: {msg}{more}" if field else f"{msg}{more}"
        return JSONResponse(ApiError(400, "invalid_request", text, field=field).body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        code = _HTTP_CODES.get(exc.status_code, "error")
        msg = exc.detail if isinstance(exc.detail, str) else code
        if exc.status_code == 404:
            msg = f"no such path {request.url.path}; see /openapi.json"
        elif exc.status_code == 413:
            msg = "the request body is too large for this server's limits"
        field = "files" if exc.status_code in (400, 413) and request.url.path.startswith("/v1/corpora") else None
        body = ApiError(exc.status_code, code, msg, field=field).body()
        return JSONResponse(body, status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(TesseraError)
    async def _tessera_error(request: Request, exc: TesseraError):
        err = error_payload(exc)
        return JSONResponse(err.body(), status_code=err.status)

    # -- ask -------------------------------------------------------------------------
    def prepare(req: AskRequest) -> tuple[CorpusEntry, int]:
        cfg = config
        if not req.question.strip():
            raise ApiError(400, "empty_question", "question: the question is empty; write a question", field="question")
        if len(req.question) > cfg.max_question_chars:
            raise ApiError(400, "question_too_long", f"question: {len(req.question)} characters; this server takes at most "
                           f"{cfg.max_question_chars}", field="question")
        if req.k > cfg.max_k:
            raise ApiError(400, "k_too_large", f"k: at most {cfg.max_k} passages on this server, got {req.k}", field="k")
        new_tokens = req.max_new_tokens or cfg.max_new_tokens
        if new_tokens > cfg.max_new_tokens_limit:
            raise ApiError(400, "max_new_tokens_too_large", f"max_new_tokens: at most {cfg.max_new_tokens_limit} on this "
                           f"server, got {new_tokens}", field="max_new_tokens")
        if req.decode == "nest" and req.k == 0:
            raise ApiError(400, "nest_needs_passages", "k: decode nest copies from retrieved passages; use k 1 or more", field="k")
        return corpora.for_ask(req.corpus, req.retriever), new_tokens

    def make_work(req: AskRequest, entry: CorpusEntry, new_tokens: int, emit=None):
        from tessera.ask import ask
        from tessera.serve.answer import ask_response, source_dict

        def work(task: Task) -> dict:
            queue_s = task.queue_s
            t0 = time.monotonic()

            def on_token(piece: str) -> None:
                worker.check(task)
                if emit:
                    emit("token", {"text": piece})

            def on_sources(sources) -> None:
                worker.check(task)
                if emit:
                    emit("sources", {"sources": [source_dict(s) for s in sources]})

            def on_answer(text: str) -> None:
                worker.check(task)
                if emit:
                    emit("answer", {"answer": text, "citing": bool(req.cite)})

            try:
                result = ask(req.question, corpus=entry.index, lm=model, k=req.k, max_new_tokens=new_tokens,
                             retriever=req.retriever, encoder=config.encoder or "default-encoder", decode=req.decode,
                             cite=req.cite, seed=config.seed, on_token=on_token, on_sources=on_sources, on_answer=on_answer,
                             should_stop=worker.stop_hook(task))
            except InputError as e:
                if req.decode == "nest" and "needs retrieved passages" in str(e):
                    raise ApiError(400, "no_passages", f"question: no passage of corpus {entry.id!r} matched the question "
                                   "and decode nest copies from retrieved passages; rephrase it or use decode greedy",
                                   field="question") from None
                raise
            out = ask_response(result, queue_s, queue_s + time.monotonic() - t0)
            out["corpus"] = entry.id
            return out

        return work

    ask_errors = _errors(400, 409, 413, 429, 500, 503, 504)

    @app.post("/v1/ask", response_model=AskResponse, responses=ask_errors, tags=["ask"])
    async def ask_json(req: AskRequest) -> dict:
        """Answer a question: sources, statements with citations (``cite``), NEST spans (``decode=nest``), timings."""
        entry, new_tokens = prepare(req)
        task = worker.submit(make_work(req, entry, new_tokens))
        try:
            remaining = task.deadline - time.monotonic() + 1.0
            return await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(task.future)), timeout=max(0.1, remaining))
        except asyncio.TimeoutError:
            task.cancelled.set()
            raise error_payload(RequestTimeout(f"the request took longer than the server's timeout of "
                                               f"{config.request_timeout_s:g} s; ask for fewer tokens or retry later")) from None
        except asyncio.CancelledError:
            task.cancelled.set()
            raise
        except Exception as e:  # noqa: BLE001
            raise error_payload(e) from None

    stream_doc = {200: {"description": "Server-sent events: `queued` {position}, `sources` {sources}, `token` {text} "
                        "(as generated), `answer` {answer, citing} (generation done), then `result` (the /v1/ask body) "
                        "or `error` (the error body).",
                        "content": {"text/event-stream": {"schema": {
                            "type": "object", "required": ["event", "data"],
                            "properties": {"event": {"type": "string", "enum": list(SSE_EVENTS)},
                                           "data": {"type": "string", "contentMediaType": "application/json"}}}}}}}

    @app.post("/v1/ask/stream", response_class=StreamingResponse, responses={**stream_doc, **ask_errors}, tags=["ask"])
    async def ask_stream(req: AskRequest):
        """The same answer as server-sent events: tokens as they are generated, citations when ready."""
        entry, new_tokens = prepare(req)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def emit(event: str, data) -> None:
            try:
                loop.call_soon_threadsafe(events.put_nowait, (event, data))
            except RuntimeError:  # the request's loop is gone (client left)
                pass

        task = worker.submit(make_work(req, entry, new_tokens, emit))
        position = worker.counts()[1]
        task.future.add_done_callback(lambda f: emit("__done__", f))

        async def stream():
            try:
                yield _sse("queued", {"position": position})
                while True:
                    remaining = task.deadline - time.monotonic() + 1.0
                    if remaining <= 0:
                        task.cancelled.set()
                        err = error_payload(RequestTimeout(f"the request took longer than the server's timeout of "
                                                           f"{config.request_timeout_s:g} s"))
                        yield _sse("error", err.body())
                        return
                    try:
                        event, data = await asyncio.wait_for(events.get(), timeout=min(SSE_PING_S, remaining))
                    except asyncio.TimeoutError:
                        yield b": ping\n\n"
                        continue
                    if event != "__done__":
                        yield _sse(event, data)
                        continue
                    exc = data.exception()
                    if exc is None:
                        yield _sse("result", data.result())
                    elif not isinstance(exc, Cancelled):
                        yield _sse("error", error_payload(exc).body())
                    return
            finally:
                if not task.future.done():
                    task.cancelled.set()

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # -- corpora and jobs --------------------------------------------------------------
    @app.get("/v1/corpora", response_model=CorpusList, tags=["corpora"])
    async def list_corpora() -> dict:
        """The corpora this server answers from (ids for ``/v1/ask``), with their indexing state."""
        return {"default": corpora.default_id, "corpora": corpora.list()}

    @app.post("/v1/corpora", status_code=202, response_model=UploadResponse, responses=_errors(400, 409, 413, 429),
              tags=["corpora"])
    async def upload_corpus(files: list[UploadFile] = File(..., description="JSONL (id, title, text per line) or .txt/.md/.rst files."),
                            name: str | None = Form(None, max_length=64, description="A name for the corpus.")) -> dict:
        """Upload documents as a new corpus; its index builds as a background job (poll ``/v1/jobs/{id}``)."""
        data = []
        total = 0
        for f in files:
            chunk = await f.read(config.max_upload_bytes + 1 - total)
            total += len(chunk)
            if total > config.max_upload_bytes:
                raise ApiError(413, "upload_too_large", f"the files hold more than {config.max_upload_bytes} bytes; "
                               "upload less", field="files")
            data.append((f.filename or "upload.txt", chunk))
        entry, job = await run_in_threadpool(corpora.upload, data, name)
        return {"corpus": entry.to_dict(), "job": job.to_dict() if job is not None else None}

    @app.delete("/v1/corpora/{corpus_id}", status_code=204, responses=_errors(400, 403, 404, 409), tags=["corpora"])
    async def delete_corpus(corpus_id: str = PathParam(..., max_length=200)) -> Response:
        """Delete an uploaded corpus (its files; its cached index stays until the cache is cleared)."""
        corpora.delete(corpus_id)
        return Response(status_code=204)

    @app.get("/v1/jobs/{job_id}", response_model=JobOut, responses=_errors(400, 404), tags=["corpora"])
    async def get_job(job_id: str = PathParam(..., max_length=64)) -> dict:
        """Progress of a background job (indexing an upload, building a dense index)."""
        job = jobs.get(job_id)
        if job is None:
            raise ApiError(404, "unknown_job", f"no job with id {job_id!r}; jobs are kept while the server runs", field="job_id")
        return job.to_dict()

    @app.get("/healthz", response_model=Health, tags=["server"])
    async def healthz() -> dict:
        """Liveness and load: the model, corpora and the queue."""
        running, waiting = worker.counts()
        return {"status": "ok", "version": __version__, "model": getattr(model, "name", str(config.lm)),
                "engine": getattr(model, "engine", ""), "encoder": config.encoder, "corpora": len(corpora.entries),
                "queue": {"running": running, "waiting": waiting, "capacity": worker.capacity}}

    # -- the page ----------------------------------------------------------------------
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    def openapi() -> dict:
        from fastapi.openapi.utils import get_openapi

        if app.openapi_schema is None:
            spec = get_openapi(title=app.title, version=app.version, summary=app.summary, description=app.description,
                               routes=app.routes)
            for ops in spec.get("paths", {}).values():  # validation errors are 400 here, not FastAPI's 422
                for op in ops.values():
                    op.get("responses", {}).pop("422", None)
            for name in ("HTTPValidationError", "ValidationError"):
                spec.get("components", {}).get("schemas", {}).pop(name, None)
            app.openapi_schema = spec
        return app.openapi_schema

    app.openapi = openapi
    return app


def serve(config: ServeConfig, lm=None) -> None:
    """Load the model, open the corpora and serve until interrupted (uvicorn)."""
    import uvicorn

    from tessera import ui

    with ui.status(f"loading {config.lm} and opening {', '.join(config.corpora)}"):
        app = create_app(config, lm)
    if config.host not in ("127.0.0.1", "localhost", "::1"):
        ui.info(f"[yellow]listening on {config.host}: reachable from other machines; the API has no authentication[/yellow]")
    ui.out.print(f"tessera serve: http://{config.host}:{config.port}/  (API docs at /docs, spec at /openapi.json; Ctrl+C stops)")
    uvicorn.run(app, host=config.host, port=config.port, log_level="warning", limit_concurrency=256,
                timeout_keep_alive=5, timeout_graceful_shutdown=5)
