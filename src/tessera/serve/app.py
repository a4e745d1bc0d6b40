"""The FastAPI app of ``tessera serve``: API routes, error bodies, server-sent events and the page.

Every error is ``{"error": {"status", "code", "message", "field"}}``: ``400`` for bad
input (``field`` names the request field), ``404`` unknown ids, ``409`` a corpus or
dense index still being built, ``413`` too large, ``429`` (with ``Retry-After``)
when the model's queue is full, ``504`` past the request timeout.

The routes live in one module per resource: :mod:`~tessera.serve.routes_ask` (``/v1/ask``,
``/v1/ask/stream``), :mod:`~tessera.serve.routes_corpora` (``/v1/corpora``, ``/v1/jobs``),
:mod:`~tessera.serve.routes_server` (``/healthz``) and :mod:`~tessera.serve.routes_page`
(``/``, ``/static``); they share one :class:`~tessera.serve.state.ServerState` on ``app.state.tessera``.
"""

from __future__ import annotations

from contextlib import asynccontextmanager

from fastapi import FastAPI

from tessera import __version__
from tessera.serve.config import ServeConfig
from tessera.serve.http_errors import BodyLimit, add_error_handlers, error_payload
from tessera.serve.routes_ask import SSE_EVENTS, SSE_PING_S, router as ask_router
from tessera.serve.routes_corpora import router as corpora_router
from tessera.serve.routes_page import STATIC, add_page
from tessera.serve.routes_server import router as server_router
from tessera.serve.state import ServerState

__all__ = ["ASK_BODY_LIMIT", "SSE_EVENTS", "SSE_PING_S", "STATIC", "BodyLimit", "ServerState", "create_app",
           "error_payload", "serve"]

ASK_BODY_LIMIT = 64 * 1024


@asynccontextmanager
async def _lifespan(app: FastAPI):
    yield
    app.state.tessera.close()


def _install_openapi(app: FastAPI) -> None:
    """The app's spec without FastAPI's ``422`` responses and schemas (validation errors are ``400`` here)."""

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


def create_app(config: ServeConfig | None = None, lm=None) -> FastAPI:
    """The app over one loaded model (``lm``: a :class:`~tessera.lm.LocalLM`, default: load ``config.lm``).

    Configured corpora are opened now (BM25 indexes build or load from the cache);
    dense indexes and uploads are indexed by background jobs.
    """
    config = config or ServeConfig()
    state = ServerState.open(config, lm)
    app = FastAPI(
        title="tessera",
        version=__version__,
        summary="Grounded answers with SelfCite citations and NEST attributed spans.",
        description="Ask a question of a corpus; the answer comes with its sources, sentence-level citations per "
                    "statement (SelfCite) and, with decode=nest, the spans copied from the corpus (NEST). "
                    "Errors are {\"error\": {status, code, message, field}}.",
        lifespan=_lifespan,
    )
    app.state.tessera = state
    app.add_middleware(BodyLimit, default=ASK_BODY_LIMIT, limits={"/v1/corpora": config.max_upload_bytes + 256 * 1024},
                       body_timeout=config.body_timeout_s)
    add_error_handlers(app)
    for router in (ask_router, corpora_router, server_router):
        app.include_router(router)
    add_page(app)
    _install_openapi(app)
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
