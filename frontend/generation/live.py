"""A live session: speech arrives as it is spoken, frames leave as soon as they can be made.

One thread per session runs an event loop over its inbox (audio as it arrives)
and its Triton calls (futures): it never blocks on one while the other has work.

    audio chunks -> 16 kHz (streaming resampler) -> IncrementalFeatures -- audio_encoder (Triton)
      -> released windows -> InFlight batches -- musetalk ensemble (Triton) -> composed frames
      -> FragmentedMp4Writer -> fragments to the client, with progress messages

Frames are never dropped: if generation cannot keep up (a CPU with the full
models), the lag grows and every progress message says so; the route stops
reading the client's audio while the lag is over `max_lag_s`, so memory stays
bounded (the audio of the lag, at 64 kB per second).
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from contract import specs
from contract.priority import Priority
from frontend import memory, metrics
from frontend.avatars.store import Avatar
from frontend.exceptions import LiveTooLong
from frontend.generation.core import Composer, Report, Utterance, write_frames
from frontend.live_first import LiveFirst
from frontend.speech.pcm import EMPTY, Pcm16, Resampler
from frontend.video.writers import FragmentedMp4Writer

log = logging.getLogger(__name__)

END, CANCEL = object(), object()
PROGRESS_EVERY_S = 0.5


@dataclass(frozen=True)
class LiveOptions:
    batch_size: int = 8  # at most this many frames per ensemble request
    in_flight: int = 3
    preset: str = "veryfast"
    max_seconds: float = 600.0  # speech per session
    max_lag_s: float = 10.0  # stop reading audio while the video is this far behind


class Latencies:
    """When each frame's audio arrived, and how long until the frame was sent."""

    def __init__(self, fps: int):
        self.fps = fps
        self.arrivals: deque[tuple[int, float]] = deque()  # (16 kHz samples received, when)
        self.values: list[float] = []

    def arrived(self, total_samples: int, when: float) -> None:
        self.arrivals.append((total_samples, when))

    def sent(self, frame: int, when: float) -> None:
        """Frame `frame` left: its audio is the audio up to its end, (frame + 1) / fps."""
        needed = (frame + 1) * specs.SAMPLE_RATE / self.fps
        while len(self.arrivals) > 1 and self.arrivals[1][0] < needed:
            self.arrivals.popleft()  # frames leave in order: older arrivals are never needed again
        for samples, at in self.arrivals:
            if samples >= needed:
                self.values.append(when - at)
                metrics.LIVE_LATENCY.observe(when - at)
                return

    def summary(self) -> dict:
        if not self.values:
            return {}
        ms = np.array(self.values) * 1000
        return {"p50": round(float(np.percentile(ms, 50)), 1), "p95": round(float(np.percentile(ms, 95)), 1),
                "max": round(float(ms.max()), 1)}


class LiveSession:
    """One live session. `feed`, `end` and `cancel` may be called from any thread; `run`
    is the session's own thread; `send` receives bytes (fMP4) and dicts (messages)."""

    def __init__(self, avatar: Avatar, fps: int, sample_rate: int, client, send: Callable[[bytes | dict], None],
                 options: LiveOptions = LiveOptions(), live_first: LiveFirst | None = None):
        self.fps, self.send, self.options = fps, send, options
        self.live_first = live_first or LiveFirst(enabled=False)  # told while its first frame is awaited
        self.pcm, self.to_16k = Pcm16(), Resampler(sample_rate, specs.SAMPLE_RATE)
        self.sample_rate = sample_rate
        self._inbox_bytes, self._inbox_lock = 0, threading.Lock()
        self.inbox: queue.Queue = queue.Queue()
        self.report = Report(frames=0, fps=fps, audio_seconds=0.0)
        self.utterance = Utterance(avatar, client, fps, self.report, options.batch_size, options.in_flight,
                                   priority=lambda: Priority.LIVE)
        self.composer = Composer(avatar, self.report)
        self.latencies = Latencies(fps)
        width, height = avatar.size
        self.writer = FragmentedMp4Writer(width, height, fps, specs.SAMPLE_RATE, options.preset)
        self.codecs = self.writer.codecs
        self.sent = 0  # frames sent
        self.started = time.perf_counter()
        self._last_progress = 0.0
        self.finished = threading.Event()

    # -- called by the route --------------------------------------------------------------
    def feed(self, pcm16: bytes) -> None:
        with self._inbox_lock:
            self._inbox_bytes += len(pcm16)
        self.inbox.put((time.perf_counter(), pcm16))

    @property
    def inbox_seconds(self) -> float:
        """Audio received and not yet taken by the session's thread."""
        return self._inbox_bytes / 2 / self.sample_rate

    def end(self) -> None:
        self.inbox.put(END)

    def cancel(self) -> None:
        self.inbox.put(CANCEL)

    @property
    def lag_s(self) -> float:
        """How far the video sent trails the audio received, in seconds."""
        return max(0.0, self.utterance.seconds - self.sent / self.fps)

    # -- the session's thread -------------------------------------------------------------
    def run(self) -> None:
        try:
            while not self._step():
                pass
        finally:
            self.live_first.arrived(self)
            self.utterance.cancel()
            self.composer.close()
            self.writer.close()
            memory.release()
            self.finished.set()

    def _step(self) -> bool:
        """One turn of the loop; True when the session is over."""
        if self._read_inbox(timeout=0.005 if self.utterance.busy else 0.05) is CANCEL:
            return True
        self.utterance.step()
        self._send_ready_frames()
        self._progress()
        if self.utterance.done:
            self._finish()
            return True
        return False

    def _read_inbox(self, timeout: float):
        try:
            item = self.inbox.get(timeout=timeout)
        except queue.Empty:
            return None
        while True:
            if item is CANCEL:
                return CANCEL
            if item is END:
                self._take_samples(self.to_16k(EMPTY, last=True), time.perf_counter())
                self.utterance.end()
            else:
                when, pcm16 = item
                with self._inbox_lock:
                    self._inbox_bytes -= len(pcm16)
                self._take_samples(self.to_16k(self.pcm(pcm16)), when)
            try:
                item = self.inbox.get_nowait()
            except queue.Empty:
                return True

    def _take_samples(self, samples: np.ndarray, when: float) -> None:
        if self.utterance.features.ended:
            return
        if self.utterance.seconds + len(samples) / specs.SAMPLE_RATE > self.options.max_seconds:
            raise LiveTooLong(f"a live session takes at most {self.options.max_seconds:g} s of speech")
        if not self.utterance.seconds and len(samples):
            self.live_first.awaited(self)  # its first frame: offline work gives way until it has left
        self.utterance.add(samples)
        self.writer.add_audio(samples)
        self.latencies.arrived(self.utterance.features.received, when)

    def _send_ready_frames(self) -> None:
        while self.utterance.ready():
            indices, faces = self.utterance.next()
            frames = [self.composer.frame(i, face) for i, face in zip(indices, faces)]
            self.send(write_frames(self.writer, frames, self.report, self.started))
            self.live_first.arrived(self)
            now = time.perf_counter()
            for i in indices:
                self.latencies.sent(i, now)
            self.sent += len(frames)

    def _progress(self, force: bool = False) -> None:
        now = time.perf_counter()
        if not force and now - self._last_progress < PROGRESS_EVERY_S:
            return
        self._last_progress = now
        self.send({"type": "progress", "frames": self.sent, "audio_seconds": round(self.utterance.seconds, 3),
                   "lag_seconds": round(self.lag_s, 3), "latency_ms": self.latencies.summary(),
                   "encoder_runs": self.utterance.features.runs})

    def _finish(self) -> None:
        self.send(self.writer.finish({"status": "done", "frames": self.sent}))
        self.report.frames, self.report.audio_seconds = self.sent, round(self.utterance.seconds, 3)
        self.report.total = time.perf_counter() - self.started
        metrics.observe_generation(self.report, "live")
        self.send({"type": "done", "frames": self.sent, "audio_seconds": round(self.utterance.seconds, 3),
                   "latency_ms": self.latencies.summary(), "encoder_runs": self.utterance.features.runs,
                   "timings": self.report.as_dict()})
