"""Every error the service answers, in one table: exception type -> HTTP status.

Errors are JSON: {"error": "...what was wrong..."}. Bad input is a 4xx and
loses nothing; 503 means Triton, a model or the default avatar is not ready yet
(retry); 502 means Triton failed on a request it accepted, 504 that it gave no answer within
the request's deadline (set from the work and the server's measured pace: client.deadlines). A live session
(WebSocket) gets the same as a message {"type": "error", "error": ..., "status": ...}
and closes with code 4000 + status (4404 unknown avatar, 4422 bad input...).
"""
from __future__ import annotations

import asyncio
import json
import logging

from fastapi import FastAPI, HTTPException, Request, WebSocket
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from client.errors import (
    DeadlineExceeded,
    InvalidInput,
    ModelNotFound,
    ModelNotReady,
    ServerUnavailable,
    TritonClientError,
)
from frontend import metrics
from frontend.access import Forbidden, Unauthorized
from frontend.admission import Overloaded, TooLong
from frontend.avatars.media import MediaError, MediaTooLarge
from frontend.avatars.store import AvatarChanged, AvatarError, AvatarExists, AvatarNotFound
from frontend.exceptions import (
    Draining,
    LiveError,
    LiveIdle,
    LiveTooLong,
    OfferError,
    PublishRefused,
    SegmentTooLong,
    SessionNotFound,
    SpeechSocketBusy,
    TooManyPublications,
    TooManySessions,
    TooManyViewers,
)
from frontend.speech.audio import AudioError

log = logging.getLogger(__name__)


class UploadTooLarge(HTTPException):
    """A body or an uploaded file over MUSETALK_MAX_UPLOAD_MB. An HTTPException, so that the
    form parser, which turns any other failure of the body into a 400, lets it through."""

    def __init__(self, message: str):
        super().__init__(413, message)

    def __str__(self) -> str:
        return self.detail


class UnsupportedMediaType(ValueError):
    """A body of the wrong Content-Type (a WHEP offer must be application/sdp)."""


class NotReady(RuntimeError):
    """The service cannot serve this yet (the default avatar is being prepared)."""


# (status, prefix of the message); the most specific class that matches wins.
STATUS: dict[type[BaseException], tuple[int, str]] = {
    UploadTooLarge: (413, ""),
    MediaTooLarge: (413, ""),
    AudioError: (422, ""),
    MediaError: (422, ""),
    AvatarError: (422, ""),
    AvatarNotFound: (404, ""),
    AvatarExists: (409, ""),
    AvatarChanged: (409, ""),
    InvalidInput: (422, ""),
    LiveError: (422, ""),
    LiveTooLong: (413, ""),
    LiveIdle: (408, ""),
    TooManySessions: (429, ""),
    TooManyViewers: (429, ""),
    Draining: (503, ""),
    Overloaded: (429, ""),
    TooLong: (503, ""),
    SessionNotFound: (404, ""),
    SpeechSocketBusy: (409, ""),
    SegmentTooLong: (413, ""),
    OfferError: (400, ""),
    PublishRefused: (403, ""),
    TooManyPublications: (429, ""),
    UnsupportedMediaType: (415, ""),
    ServerUnavailable: (503, "inference server unavailable: "),
    ModelNotReady: (503, "inference server unavailable: "),
    ModelNotFound: (503, "inference server unavailable: "),
    NotReady: (503, ""),
    DeadlineExceeded: (504, "inference timed out: "),
    TritonClientError: (502, "inference failed: "),
    Unauthorized: (401, ""),
    Forbidden: (403, ""),
}


def error_response(status: int, message: str, headers: dict | None = None, **extra) -> JSONResponse:
    return JSONResponse({"error": message, **extra}, status_code=status, headers=headers)


def status_of(error: BaseException) -> tuple[int, str]:
    """(status, message) for an exception of the table; 500 for anything else."""
    for kind in type(error).__mro__:
        if kind in STATUS:
            status, prefix = STATUS[kind]
            return status, f"{prefix}{error}"
    return 500, f"internal error: {type(error).__name__}"


async def refuse_websocket(websocket: WebSocket, error: BaseException) -> None:
    """A WebSocket's error: the message, then close code 4000 + its status."""
    status, message = status_of(error)
    try:
        async with asyncio.timeout(5):  # a client that reads nothing is not waited for: its connection is cut
            await websocket.send_json({"type": "error", "error": message, "status": status})
            await websocket.close(code=4000 + status, reason=message[:120])
    except Exception:  # noqa: BLE001 - the client may be gone already
        pass


def install(app: FastAPI) -> None:
    """Answer every exception of the table, and request validation errors, as JSON."""

    async def from_table(_: Request, error: Exception) -> JSONResponse:
        metrics.triton_error(error)
        status, message = status_of(error)
        if status >= 500:
            log.warning("%s", message)
        response = error_response(status, message, **getattr(error, "details", {}))
        if getattr(error, "retry_after", None):  # 429, 503 for work too long: when a retry may fit
            response.headers["Retry-After"] = str(error.retry_after)
        if isinstance(error, UploadTooLarge):  # the rest of the body is not wanted: the connection ends
            response.headers["Connection"] = "close"
        if isinstance(error, Unauthorized):
            response.headers["WWW-Authenticate"] = 'Bearer realm="musetalk"'

        return response

    for kind in STATUS:
        app.add_exception_handler(kind, from_table)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, error: RequestValidationError) -> JSONResponse:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'] if p != 'body')}: {e['msg']}" for e in error.errors()
        )
        return error_response(422, f"invalid request: {problems}",
                              detail=json.loads(json.dumps(error.errors(), default=str)))
