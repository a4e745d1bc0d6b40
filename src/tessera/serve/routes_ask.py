"""``POST /v1/ask`` (JSON) and ``POST /v1/ask/stream`` (server-sent events): answers from the ask worker."""

from __future__ import annotations

import asyncio
import json
import time

from fastapi import APIRouter
from fastapi.responses import StreamingResponse

from tessera.errors import InputError
from tessera.serve.corpora import CorpusEntry
from tessera.serve.engine import ApiError, Cancelled, RequestTimeout, Task
from tessera.serve.http_errors import error_payload, error_responses
from tessera.serve.schemas import AskRequest, AskResponse
from tessera.serve.state import ServerState, State

SSE_PING_S = 15.0
SSE_EVENTS = ("queued", "sources", "token", "answer", "result", "error")
ASK_ERRORS = error_responses(400, 409, 413, 429, 500, 503, 504)
STREAM_DOC = {200: {"description": "Server-sent events: `queued` {position}, `sources` {sources}, `token` {text} "
                    "(as generated), `answer` {answer, citing} (generation done), then `result` (the /v1/ask body) "
                    "or `error` (the error body).",
                    "content": {"text/event-stream": {"schema": {
                        "type": "object", "required": ["event", "data"],
                        "properties": {"event": {"type": "string", "enum": list(SSE_EVENTS)},
                                       "data": {"type": "string", "contentMediaType": "application/json"}}}}}}}

router = APIRouter()


def _sse(event: str, data) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n".encode()


def prepare(state: ServerState, req: AskRequest) -> tuple[CorpusEntry, int]:
    """Check ``req`` against the server's limits -> (the corpus to answer from, the answer's token budget)."""
    cfg = state.config
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
    features = state.features() if getattr(state.lm, "engine", "") == "openai" else {}
    for name, asked in (("cite", req.cite), ("nest", req.decode == "nest")):
        if asked and not features.get(name, {"available": True})["available"]:
            raise ApiError(400, "feature_unavailable", f"{'cite' if name == 'cite' else 'decode'}: "
                           f"{features[name]['note']}; start the server with --lm naming a local copy of the model, "
                           f"or ask without it", field="cite" if name == "cite" else "decode")
    if req.decode == "nest" and req.k == 0:
        raise ApiError(400, "nest_needs_passages", "k: decode nest copies from retrieved passages; use k 1 or more", field="k")
    return state.corpora.for_ask(req.corpus, req.retriever), new_tokens


def make_work(state: ServerState, req: AskRequest, entry: CorpusEntry, new_tokens: int, emit=None):
    """The worker's job for ``req``: :func:`tessera.ask.ask` with callbacks that check the task (and ``emit`` events)."""
    from tessera.ask import ask
    from tessera.serve.answer import ask_response, source_dict

    config, worker = state.config, state.worker

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
            result = ask(req.question, corpus=entry.index, lm=state.lm, k=req.k, max_new_tokens=new_tokens,
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


@router.post("/v1/ask", response_model=AskResponse, responses=ASK_ERRORS, tags=["ask"])
async def ask_json(req: AskRequest, state: State) -> dict:
    """Answer a question: sources, statements with citations (``cite``), NEST spans (``decode=nest``), timings."""
    entry, new_tokens = prepare(state, req)
    task = state.worker.submit(make_work(state, req, entry, new_tokens))
    try:
        remaining = task.deadline - time.monotonic() + 1.0
        return await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(task.future)), timeout=max(0.1, remaining))
    except asyncio.TimeoutError:
        task.cancelled.set()
        raise error_payload(RequestTimeout(f"the request took longer than the server's timeout of "
                                           f"{state.config.request_timeout_s:g} s; ask for fewer tokens or retry later")) from None
    except asyncio.CancelledError:
        task.cancelled.set()
        raise
    except Exception as e:  # noqa: BLE001
        raise error_payload(e) from None


async def _events(state: ServerState, task: Task, events: asyncio.Queue, position: int):
    """The stream of one task: ``queued``, then its events as they come (pings between), then ``result`` or ``error``."""
    try:
        yield _sse("queued", {"position": position})
        while True:
            remaining = task.deadline - time.monotonic() + 1.0
            if remaining <= 0:
                task.cancelled.set()
                err = error_payload(RequestTimeout(f"the request took longer than the server's timeout of "
                                                   f"{state.config.request_timeout_s:g} s"))
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


@router.post("/v1/ask/stream", response_class=StreamingResponse, responses={**STREAM_DOC, **ASK_ERRORS}, tags=["ask"])
async def ask_stream(req: AskRequest, state: State):
    """The same answer as server-sent events: tokens as they are generated, citations when ready."""
    entry, new_tokens = prepare(state, req)
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()

    def emit(event: str, data) -> None:
        try:
            loop.call_soon_threadsafe(events.put_nowait, (event, data))
        except RuntimeError:  # the request's loop is gone (client left)
            pass

    task = state.worker.submit(make_work(state, req, entry, new_tokens, emit))
    position = state.worker.counts()[1]
    task.future.add_done_callback(lambda f: emit("__done__", f))
    return StreamingResponse(_events(state, task, events, position), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
