"""Liveness, readiness and metrics: for load balancers, Kubernetes probes, Prometheus and scripts."""
from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from contract import specs
from frontend.errors import error_response
from frontend.services import Services, services

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz():
    """The process is alive."""
    return {"status": "ok"}


@router.get("/readyz")
def readyz(s: Services = Depends(services)):
    """The service can serve its default request: Triton reachable, every model ready,
    and the default avatar prepared. Otherwise 503, saying what is missing."""
    if not s.client.server_ready():
        return error_response(503, f"Triton at {s.settings.triton_url} is not reachable or not ready")
    waiting = [m for m in specs.MODELS if not s.client.model_ready(m)]
    if waiting:
        return error_response(503, f"models not ready: {', '.join(waiting)}")
    if problem := s.default_problem():
        return error_response(503, problem)
    return {"status": "ready", "models": list(specs.MODELS)}


@router.get("/metrics")
def prometheus_metrics():
    """The front end's metrics in Prometheus' text format (frontend/metrics.py says what each is)."""
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
