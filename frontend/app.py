"""The HTTP front end: POST /onnx-infer turns speech into a lip-synced avatar video.

Every network runs on Triton through the client SDK; this process does only
the non-neural work (audio features, avatars, blending, video encoding).
Errors are JSON: {"error": "...what was wrong..."} with a 4xx status for bad
input and 503 while Triton or its models are unavailable.
"""
from __future__ import annotations

import json
import logging
import threading
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response

from client import MuseTalkClient, specs
from client.errors import InvalidInput, ModelNotFound, ModelNotReady, ServerUnavailable, TritonClientError
from frontend import audio, avatars, pipeline
from frontend.settings import Settings
from frontend.video import MediaError

log = logging.getLogger("musetalk.frontend")


class UploadTooLarge(ValueError):
    pass


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings.from_env()
    store = avatars.AvatarStore(settings.avatar_dir)
    # Each request keeps `in_flight` batches in flight; room for a few requests at once.
    client = MuseTalkClient(settings.triton_url, settings.triton_protocol,
                            max_in_flight=4 * settings.in_flight)
    preparing = threading.Lock()  # one preparation at a time: it is heavy on the CPU
    default_pending = threading.Event()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if settings.default_avatar_source and not store.exists(settings.default_avatar):
            default_pending.set()
            threading.Thread(target=_prepare_default, daemon=True).start()
        yield
        client.close()

    app = FastAPI(
        title="MuseTalk on Triton",
        description="Real-time lip sync: upload speech, get a video of an avatar speaking it.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.settings, app.state.store, app.state.client = settings, store, client

    def _prepare_default() -> None:
        try:
            client.wait_until_ready(timeout_s=600, models=["vae_encoder"])
            source = Path(settings.default_avatar_source)
            _prepare(settings.default_avatar, source.read_bytes(), 0, 10)
            log.info("default avatar %r prepared from %s", settings.default_avatar, source)
        except Exception as error:  # noqa: BLE001 - the service runs on; requests will say
            log.error("could not prepare the default avatar: %s", error)
        finally:
            default_pending.clear()

    def _prepare(avatar_id: str, media: bytes, bbox_shift: int, extra_margin: int):
        with preparing:
            store.ensure_absent(avatar_id)
            avatar = avatars.prepare(avatar_id, media, client.vae_encoder, bbox_shift, extra_margin,
                                     settings.max_avatar_frames, progress=log.info)
            store.save(avatar)
            return avatar

    # -- errors ---------------------------------------------------------------------------
    def error(status: int, message: str, **extra) -> JSONResponse:
        return JSONResponse({"error": message, **extra}, status_code=status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError):
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'] if p != 'body')}: {e['msg']}" for e in exc.errors()
        )
        return error(422, f"invalid request: {problems}", detail=json.loads(json.dumps(exc.errors(), default=str)))

    @app.exception_handler(audio.AudioError)
    async def _bad_audio(_: Request, exc: audio.AudioError):
        return error(422, str(exc))

    @app.exception_handler(MediaError)
    async def _bad_media(_: Request, exc: MediaError):
        return error(422, str(exc))

    @app.exception_handler(avatars.AvatarError)
    async def _bad_avatar(_: Request, exc: avatars.AvatarError):
        return error(exc.status, str(exc))

    @app.exception_handler(UploadTooLarge)
    async def _too_large(_: Request, exc: UploadTooLarge):
        return error(413, str(exc))

    @app.exception_handler(TritonClientError)
    async def _triton(_: Request, exc: TritonClientError):
        if isinstance(exc, (ServerUnavailable, ModelNotReady, ModelNotFound)):
            return error(503, f"inference server unavailable: {exc}")
        if isinstance(exc, InvalidInput):
            return error(422, str(exc))
        return error(502, f"inference failed: {exc}")

    limit = int(settings.max_upload_mb * 2**20)

    @app.middleware("http")
    async def _upload_limit(request: Request, call_next):
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > limit + 2**16:
            return error(413, f"the upload is {int(length) / 2**20:.1f} MB; "
                              f"the limit is {settings.max_upload_mb:g} MB")
        return await call_next(request)

    def read_upload(upload: UploadFile) -> bytes:
        data = upload.file.read(limit + 1)
        if len(data) > limit:
            raise UploadTooLarge(f"{upload.filename or 'the file'} is over the "
                                 f"{settings.max_upload_mb:g} MB upload limit")
        return data

    # -- routes ---------------------------------------------------------------------------
    @app.get("/healthz", tags=["health"])
    def healthz():
        """The process is alive."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"])
    def readyz():
        """Triton is reachable and every model is ready."""
        if not client.server_ready():
            return error(503, f"Triton at {settings.triton_url} is not reachable or not ready")
        waiting = [m for m in specs.MODELS if not client.model_ready(m)]
        if waiting:
            return error(503, f"models not ready: {', '.join(waiting)}")
        return {"status": "ready", "models": list(specs.MODELS)}

    @app.post("/onnx-infer", tags=["generation"],
              responses={200: {"content": {"video/mp4": {}, "application/json": {}}}})
    def onnx_infer(
        audio_file: UploadFile = File(..., description="speech: wav, mp3, flac, ogg, ..."),
        fps: int = Form(25, ge=1, le=60, description="frames per second of the video"),
        skip_save_images: bool = Form(False, description="generate every frame but answer "
                                      "timings as JSON instead of a video (benchmark mode)"),
        avatar_id: str | None = Form(None, description="prepared avatar (default: the configured one)"),
        batch_size: int | None = Form(None, ge=1, le=specs.MUSETALK.max_batch_size,
                                      description="frames per request to Triton"),
    ):
        """Speech in, lip-synced video of the avatar out (H.264 + AAC mp4).

        Random-weight deployments (`--synthetic` exports) give real timings but
        no lip sync: the faces are noise.
        """
        wanted = avatars.check_id(avatar_id or settings.default_avatar)
        if wanted == settings.default_avatar and default_pending.is_set():
            return error(503, f"the default avatar {wanted!r} is still being prepared; retry shortly")
        avatar = store.load(wanted)
        speech = audio.decode(read_upload(audio_file), settings.max_audio_seconds)
        video, report = pipeline.generate(
            avatar, speech, fps, client, batch_size or settings.batch_size,
            settings.in_flight, encode=not skip_save_images, preset=settings.x264_preset,
        )
        headers = {"X-Frame-Count": str(report.frames), "X-Timings": json.dumps(report.as_dict())}
        if video is None:
            return JSONResponse({"avatar_id": avatar.id, **report.as_dict()}, headers=headers)
        return Response(video, media_type="video/mp4", headers=headers)

    @app.post("/avatars", status_code=201, tags=["avatars"])
    def create_avatar(
        file: UploadFile = File(..., description="an image or a short video of one face"),
        avatar_id: str = Form(..., description="1-64 letters, digits, '_' or '-'"),
        bbox_shift: int = Form(0, ge=-100, le=100, description="moves the face box's top (v1.0 knob)"),
        extra_margin: int = Form(10, ge=0, le=100, description="pixels added below the chin (v1.5)"),
    ):
        """Prepare an avatar: face boxes, crops, latents (Triton vae_encoder), blend masks."""
        store.ensure_absent(avatars.check_id(avatar_id))
        return _prepare(avatar_id, read_upload(file), bbox_shift, extra_margin).meta

    @app.get("/avatars", tags=["avatars"])
    def list_avatars():
        return {"avatars": store.list(), "default": settings.default_avatar}

    @app.get("/avatars/{avatar_id}", tags=["avatars"])
    def get_avatar(avatar_id: str):
        return store.load(avatars.check_id(avatar_id)).meta

    @app.delete("/avatars/{avatar_id}", tags=["avatars"])
    def delete_avatar(avatar_id: str):
        store.delete(avatars.check_id(avatar_id))
        return {"deleted": avatar_id}

    return app


