"""What the routes share: settings, the Triton client, the avatar store and its jobs, the
sessions, admission, access; and the parts that start with the service (frontend/startup.py).

Built once by create_app and reached by routes through the `services`
dependency, so each route module declares what it uses and nothing is global.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from fastapi import UploadFile
from starlette.requests import HTTPConnection

from client import MuseTalkClient
from contract import specs
from contract.layout import SYNTHETIC_KEY
from contract.priority import Priority
from frontend.access import OPEN, Access, ApiKeys, Caller, SessionTokens
from frontend.admission import Admission, LiveSlots
from frontend.avatars import preparation
from frontend.avatars import store as avatars
from frontend.avatars.jobs import Job, Jobs
from frontend.avatars.media import Media, open_media
from frontend.errors import NotReady, UploadTooLarge, status_of
from frontend.live_first import LiveFirst
from frontend.sessions.idle import IdleCycles
from frontend.sessions.registry import Sessions
from frontend.sessions.routing import SessionIds
from frontend.sessions.session import SessionOptions
from frontend.sessions.turn import IceServers
from frontend.settings import Settings
from frontend.startup import DefaultAvatar, PaceProbe, Readiness, TritonWatch, describe_job, warm_up

IDLE_GOP = 50  # an encoded idle cycle has a keyframe every 50 frames: where sessions may start its replay

log = logging.getLogger(__name__)


@dataclass
class Services:
    settings: Settings
    client: MuseTalkClient
    store: avatars.AvatarStore
    jobs: Jobs
    live_slots: LiveSlots  # conversational sessions and /ws/live sessions together
    sessions: Sessions
    generations: Admission  # POST /onnx-infer, whole and streamed, by frames
    live_first: LiveFirst  # offline work pauses while someone waits for a live frame
    access: Access  # who may do what (API keys, session tokens)
    pace: PaceProbe  # the first frames, and the server's pace from them
    default_avatar: DefaultAvatar
    triton_seen: TritonWatch  # whether Triton answered ready, as the readiness checks saw it
    readiness: Readiness | None = None

    @classmethod
    def create(cls, settings: Settings) -> Services:
        # Requests and live sessions each keep `in_flight` batches in flight; the client's
        # threads carry them all, so that Triton's batcher sees every session's batches.
        client = MuseTalkClient(settings.triton_url, settings.triton_protocol,
                                max_in_flight=settings.in_flight * (4 + settings.max_live_sessions),
                                priorities=settings.priorities)
        store = avatars.AvatarStore(settings.avatar_dir, int(settings.avatar_cache_mb * 2**20))
        access = Access(ApiKeys(settings.api_keys_file) if settings.api_keys_file else None,
                        SessionTokens(settings.session_token_seconds))
        slots = LiveSlots(settings.max_live_sessions, None if access.open else
                          settings.tenant_live_sessions or max(1, settings.max_live_sessions // 2))
        secret = settings.turn_secret.get_secret_value() if settings.turn_secret else None
        ice = IceServers(settings.ice_servers, settings.turn_urls, secret, settings.turn_ttl_seconds)
        routing = settings.routing_secret.get_secret_value() if settings.routing_secret else \
            shared_secret(settings.avatar_dir) if settings.replica_url else ""
        live_first = LiveFirst(settings.priorities)
        sessions = Sessions(client, slots, settings.session_idle_seconds, ice,
                            IdleCycles(settings.webrtc_video_kbps, gop=IDLE_GOP),
                            SessionIds(settings.replica_url, routing), settings.max_viewers_per_session, live_first)
        generations = Admission("generation", settings.max_frames_in_progress, settings.admission_queue,
                                settings.admission_wait_seconds, "frames",
                                pace=lambda: client.deadlines.seconds_per_item(specs.MUSETALK.name),
                                limit_s=settings.max_request_seconds,
                                per_tenant=None if access.open else
                                settings.tenant_frames_in_progress or max(1, settings.max_frames_in_progress // 2))
        services = cls(settings, client, store, None, slots, sessions, generations, live_first, access,
                       PaceProbe(client), None, TritonWatch(settings.triton_url))
        services.jobs = Jobs(store, services._prepare, status_of, settings.max_preparations)
        services.default_avatar = DefaultAvatar(settings.default_avatar, settings.default_avatar_source, store,
                                                services.jobs, client)
        services.readiness = Readiness(services._readiness_problem)
        return services

    def session_options(self, fps: int, **overrides) -> SessionOptions:
        """A new session's options: the settings, and what its request chose."""
        s = self.settings
        options = {"transition_frames": s.session_transition_frames, "silence_dbfs": s.session_silence_dbfs,
                   **overrides}
        return SessionOptions(fps=fps, batch_size=s.session_batch_size, in_flight=s.in_flight,
                              ahead_seconds=s.session_ahead_seconds, max_segment_seconds=s.max_live_seconds,
                              video_kbps=s.webrtc_video_kbps, **options)

    def live_options(self, fps: int) -> SessionOptions:
        """A /ws/live session's: unpaced, one segment of speech as long as MUSETALK_MAX_LIVE_SECONDS,
        every frame generated (no silence skipped, no fade: the video is the speech's)."""
        return dataclasses.replace(self.session_options(fps, transition_frames=0, silence_dbfs=None), paced=False,
                                   start_lead_seconds=0.0)

    def start(self) -> None:
        """At start-up: the job worker (and any preparation a crash interrupted), the
        default avatar, the first frames, and the libraries the first request would otherwise wait for."""
        self.jobs.start()
        self.jobs.resume_interrupted()
        self.default_avatar.start()
        self.readiness.start()
        self.pace.start()
        threading.Thread(target=warm_up, args=(self.store,), name="warm-up", daemon=True).start()

    @property
    def tenant_preparations(self) -> int | None:
        """Avatar preparations one tenant may have queued or running (None: no API keys, no tenants)."""
        if self.access.open:
            return None
        return self.settings.tenant_preparations or max(1, self.settings.max_preparations // 2)

    # -- uploads --------------------------------------------------------------------------
    @property
    def upload_limit(self) -> int:
        return int(self.settings.max_upload_mb * 2**20)

    def read_upload(self, upload: UploadFile) -> bytes:
        data = upload.file.read(self.upload_limit + 1)
        if len(data) > self.upload_limit:
            raise UploadTooLarge(f"{upload.filename or 'the file'} is over the "
                                 f"{self.settings.max_upload_mb:g} MB upload limit")
        return data

    # -- avatars --------------------------------------------------------------------------
    def avatar(self, avatar_id: str | None, caller: Caller = OPEN) -> avatars.Avatar:
        """The avatar a request asks for (default: the configured one): the caller's own of that
        id, else the shared one."""
        if not avatar_id and not self.settings.default_avatar:
            raise avatars.AvatarError("name an avatar (avatar_id): this service has no default avatar")
        wanted = avatars.check_id(avatar_id or self.settings.default_avatar)
        keys = self.avatar_keys(wanted, caller)
        for key in keys:
            if self.store.exists(key):
                return self.store.load(key)
        for key in keys:
            job = self.jobs.status(key)
            if job and job.get("status") == "failed":  # retrying will not help
                raise avatars.AvatarNotFound(f"avatar {wanted!r} could not be prepared: {job.get('error')}")
            if job:
                raise NotReady(f"avatar {wanted!r} is {describe_job(job)}; retry shortly")
        if wanted == self.settings.default_avatar and self.default_avatar.starting:
            raise NotReady(f"avatar {wanted!r} is {describe_job(None)}; retry shortly")
        raise avatars.AvatarNotFound(
            f"unknown avatar {wanted!r}: prepare it first with POST /avatars (avatar_id={wanted}, and a photo or "
            "a video of one face); GET /avatars lists those there are")

    @staticmethod
    def avatar_keys(avatar_id: str, caller: Caller) -> list[str]:
        """Where the avatar `caller` means by `avatar_id` may be stored: its own, then the shared one."""
        own = avatars.storage_key(caller.tenant, avatar_id)
        return [own] if caller.tenant is None else [own, avatar_id]

    def open_media(self, data: bytes) -> Media:
        return open_media(data, self.settings.max_avatar_seconds, self.settings.max_image_pixels)

    def _prepare(self, job: Job, progress, cancelled) -> dict:
        params = job.read()["params"]
        media = self.open_media(job.upload.read_bytes())
        def encode(crops):
            return self.client.submit(self.client.vae_encoder, crops, priority=Priority.PREPARATION)

        return preparation.prepare(job.avatar_id, media, encode, job.staging, params["bbox_shift"],
                                   params["extra_margin"], progress, cancelled, self.live_first.give_way)

    async def drain(self) -> None:
        """The replica is shutting down (SIGTERM: python -m frontend): sessions move elsewhere."""
        await self.sessions.drain(self.settings.drain_seconds)

    def _readiness_problem(self) -> str | None:
        """What keeps the service from serving its default request (None: nothing)."""
        if self.sessions.draining:
            return "draining: this replica is shutting down"
        if not self.triton_seen.ready(self.client.server_ready()):
            return f"Triton at {self.settings.triton_url} is not reachable or not ready"
        waiting = [m for m in specs.MODELS if not self.client.model_ready(m)]
        if waiting:
            return f"models not ready: {', '.join(waiting)}"
        return self.default_avatar.problem() or self.pace.problem()

    # -- models ---------------------------------------------------------------------------
    def synthetic_weights(self) -> bool | None:
        """Whether the served models have random weights: the setting, else what the
        model config says (the local server records it), else None (unknown)."""
        if self.settings.synthetic_weights is not None:
            return self.settings.synthetic_weights
        try:
            parameters = self.client.model_config("unet").get("parameters", {})
        except Exception:  # noqa: BLE001 - unknown while Triton is away
            return None
        value = parameters.get(SYNTHETIC_KEY, {}).get("string_value")
        return {"true": True, "false": False}.get(value)

    def close(self) -> None:
        self.pace.stop()
        self.readiness.close()
        self.jobs.close()
        self.client.close()


def shared_secret(folder: Path, name: str = ".routing-secret") -> str:
    """A secret every replica sharing `folder` (the avatar volume) reads alike: made by the first
    one to look (created exclusively: a second replica racing it reads the first one's)."""
    path = Path(folder) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        for _ in range(50):  # the one that made it may still be writing it
            if value := path.read_text().strip():
                return value
            time.sleep(0.1)
        raise RuntimeError(f"{path} is empty: delete it and restart") from None
    value = secrets.token_urlsafe(32)
    with os.fdopen(descriptor, "w") as file:
        file.write(value)
    return value


def services(connection: HTTPConnection) -> Services:
    """The dependency every route takes its services from."""
    return connection.app.state.services
