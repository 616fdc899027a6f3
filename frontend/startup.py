"""What a front end does as it starts, each part on a thread of its own, and what /readyz asks them.

- `PaceProbe`: two frames through the ensemble (and a window through the audio encoder) as soon
  as Triton is ready, so the first request's deadlines and the admission's time limit follow
  from this server's pace, and the first request pays no first-call costs.
- `DefaultAvatar`: the configured default avatar prepared from its source when it is missing.
- `warm_up`: the libraries the first request would otherwise wait for (librosa's filters),
  and avatars of an earlier format upgraded.
- `TritonWatch`: Triton going away and coming back, logged and counted.
- `Readiness`: a check run every second on a thread of its own; /readyz reads its last answer.
"""
from __future__ import annotations

import io
import logging
import threading
import time
import wave
from collections.abc import Callable
from pathlib import Path

import numpy as np

from contract import specs
from contract.priority import Priority
from frontend import metrics

log = logging.getLogger(__name__)

PACE_STAGGER_S = 0.05  # the second frame of the pace measurement is sent this long after the first


class PaceProbe:
    """Sends a server's first frames as soon as it is ready, and learns its pace from them."""

    def __init__(self, client):
        self.client = client
        self.done = threading.Event()  # one frame has been through Triton: its pace is known
        self._stopped = threading.Event()

    def start(self) -> None:
        threading.Thread(target=self._run, name="first-frames", daemon=True).start()

    def _run(self) -> None:
        """The second frame follows the first closely, as requests do in use: its unet runs beside
        the first one's decoder (a lone frame would make the pace look half as fast on a CPU).
        Triton away means trying again."""
        audio, latents = (np.zeros((1, *t.shape), np.float32) for t in specs.MUSETALK.inputs)
        mel = np.zeros((1, *specs.AUDIO_ENCODER.inputs[0].shape), np.float32)
        while not self.done.is_set() and not self._stopped.is_set():
            try:
                self.client.wait_until_ready(timeout_s=3600, models=[specs.MUSETALK.name, specs.AUDIO_ENCODER.name])
                self.client.audio_encoder(mel, priority=Priority.OFFLINE)
                first = self.client.submit(self.client.musetalk, audio, latents, priority=Priority.OFFLINE)
                time.sleep(PACE_STAGGER_S)
                second = self.client.submit(self.client.musetalk, audio, latents, priority=Priority.OFFLINE)
                first.result(), second.result()
            except Exception as error:  # noqa: BLE001 - Triton away or restarting: try again
                if not self._stopped.is_set():
                    log.warning("could not send a first frame to Triton (trying again): %s", error)
                self._stopped.wait(2)
                continue
            self.done.set()
            log.info("Triton answered its first frames: %.3g s per frame here",
                     self.client.deadlines.seconds_per_item(specs.MUSETALK.name))

    def problem(self) -> str | None:
        return None if self.done.is_set() else "sending a first frame through Triton (to learn its pace)"

    def stop(self) -> None:
        self._stopped.set()


class DefaultAvatar:
    """The avatar of requests that name none: prepared from `source` at start-up when missing
    (a shared avatar: every tenant uses it), and what keeps it from serving yet."""

    def __init__(self, name: str, source: str, store, jobs, client):
        self.name, self.source, self.store, self.jobs, self.client = name, source, store, jobs, client
        self._thread: threading.Thread | None = None  # preparing it (waits for Triton)
        self._error: str | None = None  # why that failed before its job existed

    def start(self) -> None:
        if self.source and not self.store.exists(self.name) and not self.jobs.status(self.name):
            self._thread = threading.Thread(target=self._prepare, args=(Path(self.source),), daemon=True,
                                            name="default-avatar")
            self._thread.start()

    @property
    def starting(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _prepare(self, source: Path) -> None:
        try:
            self.client.wait_until_ready(timeout_s=600, models=["vae_encoder"])
            self.jobs.submit(self.name, source.read_bytes(), {"bbox_shift": 0, "extra_margin": 10})
            log.info("preparing the default avatar %r from %s", self.name, source)
        except Exception as error:  # noqa: BLE001 - the service runs on; /readyz says why
            self._error = str(error) or type(error).__name__
            log.error("could not prepare the default avatar: %s", error)

    def problem(self) -> str | None:
        """Why a request that names no avatar would fail now (None: it would not, or none is configured)."""
        if not self.name or self.store.exists(self.name):
            return None
        job = self.jobs.status(self.name)  # this replica's job or another's
        if job and job.get("status") == "failed":
            return f"the default avatar {self.name!r} could not be prepared: {job.get('error')}"
        if job:
            return f"the default avatar {self.name!r} is {describe_job(job)}"
        if self.starting:
            return f"the default avatar {self.name!r} is still being prepared (waiting for Triton)"
        if self._error:
            return f"the default avatar {self.name!r} could not be prepared: {self._error}"
        if not self.source:
            return (f"the default avatar {self.name!r} does not exist: prepare it (POST /avatars with "
                    f"avatar_id={self.name}), set MUSETALK_DEFAULT_AVATAR_SOURCE, or set MUSETALK_DEFAULT_AVATAR= "
                    "(empty: requests must name their avatar)")
        return f"the default avatar {self.name!r} is missing (deleted?); a restart prepares it again"


def describe_job(job: dict | None) -> str:
    """"still being prepared (40%)": a job under way."""
    return f"still being prepared ({(job or {}).get('progress', 0):.0%})"


def warm_up(store) -> None:
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

    def __init__(self, check: Callable[[], str | None]):
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
