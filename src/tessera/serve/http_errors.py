"""The API's error bodies: exception handlers, documented error responses and the request body limit.

Every error is ``{"error": {"status", "code", "message", "field"}}`` (see :mod:`tessera.serve.app`).
"""

from __future__ import annotations

import asyncio
import logging

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from tessera.errors import ContextTooLongError, TesseraError
from tessera.serve.engine import ApiError, RequestTimeout
from tessera.serve.schemas import ErrorResponse

log = logging.getLogger("tessera.serve")

HTTP_CODES = {400: "bad_request", 403: "forbidden", 404: "not_found", 405: "method_not_allowed", 409: "conflict",
              413: "too_large", 415: "unsupported_media_type", 429: "too_many_requests", 500: "internal_error",
              503: "unavailable", 504: "timeout"}


def error_responses(*codes: int) -> dict:
    """The OpenAPI ``responses`` of a route for these error status codes."""
    return {c: {"model": ErrorResponse, "description": HTTP_CODES.get(c, "error").replace("_", " ")} for c in codes}


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


class _TooLarge(HTTPException):
    """Raised while reading a body past its limit (an HTTPException, so FastAPI's body parsing passes it on)."""

    def __init__(self):
        super().__init__(413, "the request body is too large for this server's limits")


class _BodyTimeout(HTTPException):
    """A request body stalled: no part of it came for the server's body timeout (an HTTPException, as _TooLarge)."""

    def __init__(self, seconds: float):
        super().__init__(408, f"the request body stalled: nothing came for {seconds:g} s; send the whole body at once")


class BodyLimit:
    """Pure ASGI middleware: request bodies over the path's limit get a JSON 413, before or while they are read;
    a body that stalls (no bytes for ``body_timeout`` seconds before it is complete) gets a JSON 408, so clients
    that never finish their bodies cannot hold the server's connections (uvicorn has no body timeout)."""

    def __init__(self, app, default: int, limits: dict[str, int], body_timeout: float | None = None):
        self.app, self.default, self.limits, self.body_timeout = app, default, limits, body_timeout

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
        seen, started, complete = 0, False, False

        async def limited_receive():
            nonlocal seen, complete
            if complete or not self.body_timeout:  # after the body: a streamed answer waits here for a disconnect
                message = await receive()
            else:
                try:
                    message = await asyncio.wait_for(receive(), self.body_timeout)
                except asyncio.TimeoutError:
                    raise _BodyTimeout(self.body_timeout) from None
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                complete = not message.get("more_body", False)
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
        except _BodyTimeout:
            if not started:
                stalled = ApiError(408, "body_timeout", f"the request body stalled: nothing came for {self.body_timeout:g} s; "
                                   "send the whole body at once", field=field)
                await JSONResponse(stalled.body(), status_code=408, headers={"Connection": "close"})(scope, receive, send)


async def _api_error(request: Request, exc: ApiError):
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


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


async def _http_error(request: Request, exc: StarletteHTTPException):
    code = HTTP_CODES.get(exc.status_code, "error")
    msg = exc.detail if isinstance(exc.detail, str) else code
    if exc.status_code == 404:
        msg = f"no such path {request.url.path}; see /openapi.json"
    elif exc.status_code == 413:
        msg = "the request body is too large for this server's limits"
    field = "files" if exc.status_code in (400, 413) and request.url.path.startswith("/v1/corpora") else None
    body = ApiError(exc.status_code, code, msg, field=field).body()
    return JSONResponse(body, status_code=exc.status_code, headers=getattr(exc, "headers", None))


async def _tessera_error(request: Request, exc: TesseraError):
    err = error_payload(exc)
    return JSONResponse(err.body(), status_code=err.status)


def add_error_handlers(app: FastAPI) -> None:
    """Every error of ``app`` as the API's error body (validation errors are ``400`` here, not ``422``)."""
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(TesseraError, _tessera_error)
