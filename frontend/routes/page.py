"""GET /: the page to try it (plain HTML and JavaScript, served from frontend/static/), and /info."""
from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from fastapi import APIRouter, Depends
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from contract import specs
from frontend.services import Services, services

STATIC = Path(str(files("frontend") / "static"))  # the page's files, packaged with the service
router = APIRouter(tags=["page"])
static = StaticFiles(directory=STATIC)


@router.get("/", include_in_schema=False)
def page():
    return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})


@router.get("/info")
def info(s: Services = Depends(services)):
    """What the page shows: whether the models have random weights (no lip sync), and limits;
    and the inference server's measured pace (seconds per frame through the ensemble, as this
    front end has seen it; null before its first frame), which the time limit applies to."""
    return {"synthetic_weights": s.synthetic_weights(), "default_avatar": s.settings.default_avatar,
            "api_keys": not s.access.open,
            "max_audio_seconds": s.settings.max_audio_seconds, "max_upload_mb": s.settings.max_upload_mb,
            "seconds_per_frame": s.client.deadlines.seconds_per_item(specs.MUSETALK.name),
            "max_request_seconds": s.settings.max_request_seconds}
