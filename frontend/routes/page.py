"""GET /: the page to try it (plain HTML and JavaScript, served from frontend/static/), and /info."""
from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Depends
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from frontend.services import Services, services

STATIC = Path(__file__).resolve().parent.parent / "static"
router = APIRouter(tags=["page"])
static = StaticFiles(directory=STATIC)


@router.get("/", include_in_schema=False)
def page():
    return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})


@router.get("/info")
def info(s: Services = Depends(services)):
    """What the page shows: whether the models have random weights (no lip sync), and limits."""
    return {"synthetic_weights": s.synthetic_weights(), "default_avatar": s.settings.default_avatar,
            "max_audio_seconds": s.settings.max_audio_seconds, "max_upload_mb": s.settings.max_upload_mb}
