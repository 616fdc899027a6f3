"""The HTTP front end: POST /onnx-infer turns speech into a lip-synced avatar video.

Every network runs on Triton through the client SDK; this process does only
the non-neural work (audio features, avatars, blending, video encoding).
Errors are JSON (frontend/errors.py has the one table of statuses).

    uvicorn --factory frontend.app:create_app      # settings from MUSETALK_* (frontend/settings.py)
"""
from __future__ import annotations

import asyncio
import time
import uuid
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware

from contract import logs
from frontend import errors, metrics
from frontend.access import OriginCheck
from frontend.routes import avatars, generation, health, live, page, sessions
from frontend.services import Services
from frontend.sessions.routing import SessionRouter
from frontend.settings import Settings

ENVELOPE = 2**16  # what multipart adds around an upload of the limit's size


class BodyLimit:
    """Every request body is held to `limit` bytes while it streams: one that declares a
    larger Content-Length is refused before it is read; one that does not (chunked) is
    refused as soon as it passes the limit, so no more than that is read (and spooled to
    disk by the form parser). Both are a JSON 413."""

    def __init__(self, app, limit: int, megabytes: float):
        self.app, self.limit, self.megabytes = app, limit, megabytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.limit:
            response = errors.error_response(413, f"the upload is {int(length) / 2**20:.1f} MB; the limit "
                                                  f"is {self.megabytes:g} MB", headers={"Connection": "close"})
            return await response(scope, receive, send)
        received = 0

        async def counted():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:
                raise errors.UploadTooLarge(f"the upload is over the {self.megabytes:g} MB limit")
            return message

        await self.app(scope, counted, send)


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

    app.add_middleware(BodyLimit, limit=services.upload_limit + ENVELOPE, megabytes=services.settings.max_upload_mb)
    if services.settings.allowed_origins:  # pages of those sites may call it from browsers (with their key)
        app.add_middleware(CORSMiddleware, allow_origins=services.settings.allowed_origins, allow_methods=["*"],
                           allow_headers=["Authorization", "Content-Type"],
                           expose_headers=["Location", "Link", "Retry-After", "X-Frame-Count", "X-Timings"])
    # A request for a session another replica holds goes there as it came (its credential too).
    app.add_middleware(SessionRouter, ids=services.sessions.ids)
    # Outermost: a page of another site is refused before anything else looks at its request.
    app.add_middleware(OriginCheck, allowed=services.settings.allowed_origins)

    @app.middleware("http")
    async def count_requests(request: Request, call_next):
        logs.bind(request=request.headers.get("x-request-id", "")[:64] or uuid.uuid4().hex[:12])
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
