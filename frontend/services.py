"""What the routes share: settings, the Triton client, the avatar store and its jobs.

Built once by create_app and reached by routes through the `services`
dependency, so each route module declares what it uses and nothing is global.
"""
from __future__ import annotations

import io
import logging
import threading
import time
import wave
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from fastapi import UploadFile
from starlette.requests import HTTPConnection

from client import MuseTalkClient
from contract import specs
from contract.layout import SYNTHETIC_KEY
from contract.priority import Priority
from frontend import metrics
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

PACE_STAGGER_S = 0.05  # the second frame of the pace measurement is sent this long after the first
IDLE_GOP = 50  # an encoded idle cycle has a keyframe every 50 frames: where sessions may start its replay

log = logging.getLogger("musetalk.frontend")


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
    readiness: Readiness | None = None
    _default_thread: threading.Thread | None = None  # preparing the default avatar (waits for Triton)
    _default_error: str | None = None  # why that failed before its job existed
    warmed: threading.Event | None = None  # one frame has been through Triton: its pace is known
    triton_seen: TritonWatch | None = None  # whether Triton answered ready, as the readiness checks saw it

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
        services = cls(settings, client, store, None, slots, sessions, generations,
                       live_first, access, warmed=threading.Event(),
                       triton_seen=TritonWatch(settings.triton_url))
        services.jobs = Jobs(store, services._prepare, status_of, settings.max_preparations)
        services.readiness = Readiness(services._readiness_problem)
        return services

    def session_options(self, fps: int, **overrides) -> SessionOptions:
        """A new session's options: the settings, and what its request chose."""
        s = self.settings
        options = {"transition_frames": s.session_transition_frames, "silence_dbfs": s.session_silence_dbfs,
                   **overrides}
        return SessionOptions(fps=fps, batch_size=min(s.batch_size, 8), in_flight=s.in_flight,
                              ahead_seconds=s.session_ahead_seconds, max_segment_seconds=s.max_live_seconds,
                              video_kbps=s.webrtc_video_kbps, **options)

    def start(self) -> None:
        """At start-up: the job worker (and any preparation a crash interrupted), the
        default avatar, and the libraries the first request would otherwise wait for."""
        self.jobs.start()
        self.jobs.resume_interrupted()
        self.start_default_avatar()
        self.readiness.start()
        threading.Thread(target=_warm_up, args=(self.store,), name="warm-up", daemon=True).start()
        threading.Thread(target=self._measure_pace, name="first-frame", daemon=True).start()

    def _measure_pace(self) -> None:
        """Send two frames through the ensemble (and one window through the audio encoder) as
        soon as Triton is ready: the client then knows this server's pace, so the first request's
        deadlines and the admission's time limit follow from it, and the first request pays no
        first-call costs of its own. The second frame follows the first closely, as requests do
        in use: its unet runs beside the first one's decoder (a lone frame would make the pace
        look half as fast on a CPU). Readiness waits for it; Triton away means trying again."""
        audio, latents = (np.zeros((1, *t.shape), np.float32) for t in specs.MUSETALK.inputs)
        mel = np.zeros((1, *specs.AUDIO_ENCODER.inputs[0].shape), np.float32)
        while not self.warmed.is_set():
            try:
                self.client.wait_until_ready(timeout_s=3600, models=[specs.MUSETALK.name, specs.AUDIO_ENCODER.name])
                self.client.audio_encoder(mel, priority=Priority.OFFLINE)
                first = self.client.submit(self.client.musetalk, audio, latents, priority=Priority.OFFLINE)
                time.sleep(PACE_STAGGER_S)
                second = self.client.submit(self.client.musetalk, audio, latents, priority=Priority.OFFLINE)
                first.result(), second.result()
            except Exception as error:  # noqa: BLE001 - Triton away or restarting: try again
                log.warning("could not send a first frame to Triton (trying again): %s", error)
                time.sleep(2)
                continue
            self.warmed.set()
            log.info("Triton answered its first frames: %.3g s per frame here",
                     self.client.deadlines.seconds_per_item(specs.MUSETALK.name))

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
        if wanted == self.settings.default_avatar and self._default_starting():
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
        problem = self.default_problem()
        if problem is None and not self.warmed.is_set():
            problem = "sending a first frame through Triton (to learn its pace)"
        return problem

    def default_problem(self) -> str | None:
        """Why the configured default avatar cannot serve yet (for /readyz); None if it can,
        or if none is configured."""
        wanted = self.settings.default_avatar
        if not self.settings.default_avatar_source or self.store.exists(wanted):
            return None
        job = self.jobs.status(wanted)  # this replica's job or another's
        if job and job.get("status") == "failed":
            return f"the default avatar {wanted!r} could not be prepared: {job.get('error')}"
        if job:
            return f"the default avatar {wanted!r} is {describe_job(job)}"
        if self._default_starting():
            return f"the default avatar {wanted!r} is still being prepared (waiting for Triton)"
        if self._default_error:
            return f"the default avatar {wanted!r} could not be prepared: {self._default_error}"
        return f"the default avatar {wanted!r} is missing (deleted?); a restart prepares it again"

    def _default_starting(self) -> bool:
        return self._default_thread is not None and self._default_thread.is_alive()

    def start_default_avatar(self) -> None:
        """Prepare the default avatar in the background when it is missing; until it is
        ready, /readyz answers 503."""
        wanted = self.settings.default_avatar
        if self.settings.default_avatar_source and not self.store.exists(wanted) and not self.jobs.status(wanted):
            self._default_thread = threading.Thread(
                target=self._prepare_default, args=(Path(self.settings.default_avatar_source),),
                daemon=True, name="default-avatar")
            self._default_thread.start()

    def _prepare_default(self, source: Path) -> None:
        try:
            self.client.wait_until_ready(timeout_s=600, models=["vae_encoder"])
            self.jobs.submit(self.settings.default_avatar, source.read_bytes(), {"bbox_shift": 0, "extra_margin": 10})
            log.info("preparing the default avatar %r from %s", self.settings.default_avatar, source)
        except Exception as error:  # noqa: BLE001 - the service runs on; /readyz says why
            self._default_error = str(error) or type(error).__name__
            log.error("could not prepare the default avatar: %s", error)

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
        self.readiness.close()
        self.jobs.close()
        self.client.close()


class TritonWatch:
    """Triton going away and coming back, as the readiness checks see it: logged, and counted
    (musetalk_triton_ready, musetalk_triton_outages_total). A local stack's supervisor restarts a
    tritonserver that died and says why in its own log; Kubernetes restarts a Triton pod."""

    def __init__(self, url: str):
        self.url = url
        self.up: bool | None = None  # not checked yet
        self.since = time.monotonic()

    def ready(self, up: bool) -> bool:
        if up != self.up:
            now = time.monotonic()
            if up:
                log.info("Triton at %s is ready%s", self.url,
                         f" again after {now - self.since:.1f} s" if self.up is False else "")
            elif self.up:
                metrics.TRITON_OUTAGES.inc()
                log.warning("Triton at %s stopped answering: requests to it fail until it is back", self.url)
            metrics.TRITON_READY.set(int(up))
            self.up, self.since = up, now
        return up


class Readiness:
    """`check()` run by a thread of its own every EVERY_S seconds (it asks Triton, which
    may take seconds when it is away): /readyz reads the last answer, never waits for one."""

    EVERY_S = 1.0
    STALE_S = 30.0

    def __init__(self, check):
        self.check = check
        self.last: tuple[float, str | None] = (0.0, "not checked yet")
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="readiness", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def problem(self) -> str | None:
        checked, problem = self.last
        if time.monotonic() - checked > self.STALE_S and checked:
            return f"the readiness check has not answered for {time.monotonic() - checked:.0f} s"
        return problem

    def _run(self) -> None:
        while True:
            try:
                problem = self.check()
            except Exception as error:  # noqa: BLE001 - a failing check is a reason, not a crash
                problem = f"readiness check failed: {error}"
            self.last = (time.monotonic(), problem)
            if self._stop.wait(self.EVERY_S):
                return

    def close(self) -> None:
        self._stop.set()


def shared_secret(folder: Path, name: str = ".routing-secret") -> str:
    """A secret every replica sharing `folder` (the avatar volume) reads alike: made by the first
    one to look (created exclusively: a second replica racing it reads the first one's)."""
    import os
    import secrets

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


def describe_job(job: dict | None) -> str:
    """"still being prepared (40%)": a job under way."""
    return f"still being prepared ({(job or {}).get('progress', 0):.0%})"


def services(connection: HTTPConnection) -> Services:
    """The dependency every route takes its services from."""
    return connection.app.state.services


def _warm_up(store: avatars.AvatarStore) -> None:
    """Do what the first requests would otherwise wait for: upgrade avatars of an earlier
    format, load librosa's mel filters and resampler (about 1.5 s at the first call)."""
    from frontend.speech import audio

    try:
        store.upgrade_all()
    except Exception as error:  # noqa: BLE001 - requests for that avatar will say
        log.error("could not upgrade the stored avatars: %s", error)

    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as silence:
        silence.setnchannels(1), silence.setsampwidth(2), silence.setframerate(22050)
        silence.writeframes(b"\0\0" * 2205)
    audio.decode(buffer.getvalue())
    audio.log_mel(np.zeros(audio.SEGMENT_SAMPLES // 30, np.float32))
