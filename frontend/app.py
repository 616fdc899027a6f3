"""The HTTP front end: POST /onnx-infer turns speech into a lip-synced avatar video.

Every network runs on Triton through the client SDK; this process does only
the non-neural work (audio features, avatars, blending, video encoding).
Errors are JSON (frontend/errors.py has the one table of statuses).

    uvicorn --factory frontend.app:create_app      # settings from MUSETALK_* (frontend/settings.py)
"""
from __future__ import annotations

import asyncio
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request

from frontend import errors, metrics
from frontend.routes import avatars, generation, health, live, page, sessions
from frontend.services import Services
from frontend.settings import Settings


def create_app(settings: Settings | None = None) -> FastAPI:
    services = Services.create(settings or Settings())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        services.start()
        expiring = asyncio.create_task(services.sessions.keep_expiring())
        yield
        expiring.cancel()
        await services.sessions.close()
        services.close()

    app = FastAPI(
        title="MuseTalk on Triton",
        description="Real-time lip sync: upload speech, get a video of an avatar speaking it.",
        version="0.2.0",
        lifespan=lifespan,
    )
    app.state.services = services
    errors.install(app)

    @app.middleware("http")
    async def refuse_large_uploads(request: Request, call_next):
        # Before the body is read: a declared length over the limit never reaches a route.
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > services.upload_limit + 2**16:
            return errors.error_response(413, f"the upload is {int(length) / 2**20:.1f} MB; the limit "
                                              f"is {services.settings.max_upload_mb:g} MB")
        return await call_next(request)

    @app.middleware("http")
    async def count_requests(request: Request, call_next):
        started, status = time.perf_counter(), "500"  # unless an answer comes: an exception no handler took
        try:
            response = await call_next(request)
            status = str(response.status_code)
            return response
        finally:
            route = getattr(request.scope.get("route"), "path", "unmatched")  # the template: no ids in labels
            metrics.REQUESTS.labels(route, request.method, status).inc()
            # Until the answer starts: a streamed answer's whole time is in the generation metrics.
            metrics.REQUEST_SECONDS.labels(route).observe(time.perf_counter() - started)

    for module in (health, generation, avatars, live, sessions, page):
        app.include_router(module.router)
    app.mount("/static", page.static, name="static")
    return app
