"""``GET /healthz``: liveness and load of the server."""

from __future__ import annotations

from fastapi import APIRouter

from tessera import __version__
from tessera.serve.schemas import Health
from tessera.serve.state import State

router = APIRouter()


@router.get("/healthz", response_model=Health, tags=["server"])
async def healthz(state: State) -> dict:
    """Liveness and load: the model, corpora and the queue."""
    model, config, worker = state.lm, state.config, state.worker
    running, waiting = worker.counts()
    return {"status": "ok", "version": __version__, "model": getattr(model, "name", str(config.lm)),
            "engine": getattr(model, "engine", ""), "encoder": config.encoder, "corpora": len(state.corpora.entries),
            "queue": {"running": running, "waiting": waiting, "capacity": worker.capacity},
            "batching": state.batching_info(), "features": state.features()}
