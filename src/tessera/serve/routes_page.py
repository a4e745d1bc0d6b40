"""The web page: ``/`` (``static/index.html``) and its files under ``/static``."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

STATIC = Path(__file__).parent / "static"

router = APIRouter()


@router.get("/", include_in_schema=False)
async def page():
    return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})


def add_page(app: FastAPI) -> None:
    """Mount ``/static`` and route ``/`` to the page."""
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.include_router(router)
