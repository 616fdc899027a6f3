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
async def healthz():
    """The process is alive. On the event loop, not the worker threads: it answers in
    milliseconds however busy the generations keep those."""
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(s: Services = Depends(services)):
    """The service can serve its default request: Triton reachable, every model ready, and
    the default avatar prepared (or none is configured). Otherwise 503, saying what is missing.
    The answer is the last check of a background thread (every second), so it takes
    milliseconds under any load. A front end at capacity stays ready: it answers 429 with a
    Retry-After at once, while an unready one would be taken out of the Service, its sessions
    cut off from it, and its load moved to replicas likely as busy."""
    problem = s.readiness.problem()
    if problem:
        return error_response(503, problem)
    return {"status": "ready", "models": list(specs.MODELS)}


@router.get("/metrics")
async def prometheus_metrics():
    """The front end's metrics in Prometheus' text format (frontend/metrics.py says what each is)."""
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
