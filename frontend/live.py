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
from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np

from contract import specs
from frontend import memory, metrics
from frontend.avatars import Avatar
from frontend.live_features import IncrementalFeatures
from frontend.pipeline import InFlight, Report
from frontend.video import FragmentedMp4Writer

log = logging.getLogger("musetalk.frontend")

END, CANCEL = object(), object()
PROGRESS_EVERY_S = 0.5


@dataclass(frozen=True)
class LiveOptions:
    batch_size: int = 8  # at most this many frames per ensemble request
    in_flight: int = 3
    preset: str = "veryfast"
    max_seconds: float = 600.0  # speech per session
    max_lag_s: float = 10.0  # stop reading audio while the video is this far behind


class LiveError(ValueError):
    """A live session's input that cannot be used (the client gets it as an error message)."""


class LiveTooLong(LiveError):
    """More speech than a session may take."""


class TooManySessions(RuntimeError):
    """Every live session slot is taken."""


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
                 options: LiveOptions = LiveOptions()):
        import soxr

        self.avatar, self.fps, self.client, self.send, self.options = avatar, fps, client, send, options
        self.resampler = soxr.ResampleStream(sample_rate, specs.SAMPLE_RATE, 1, dtype="float32", quality="HQ") \
            if sample_rate != specs.SAMPLE_RATE else None
        self.inbox: queue.Queue = queue.Queue()
        self.features = IncrementalFeatures(fps)
        self.report = Report(frames=0, fps=fps, audio_seconds=0.0)
        self.flight = InFlight(avatar, client, self.report)
        self.latencies = Latencies(fps)
        width, height = avatar.size
        self.writer = FragmentedMp4Writer(width, height, fps, specs.SAMPLE_RATE, options.preset)
        self.codecs = self.writer.codecs
        self.waiting: deque[tuple[int, np.ndarray]] = deque()  # released windows not yet submitted
        self.encoding: tuple[tuple[int, int], Future] | None = None  # the audio_encoder run in flight
        self.sent = 0  # frames sent
        self.started = time.perf_counter()
        self._odd_byte = b""
        self._last_progress = 0.0
        self.finished = threading.Event()

    # -- called by the route --------------------------------------------------------------
    def feed(self, pcm16: bytes) -> None:
        self.inbox.put((time.perf_counter(), pcm16))

    def end(self) -> None:
        self.inbox.put(END)

    def cancel(self) -> None:
        self.inbox.put(CANCEL)

    @property
    def lag_s(self) -> float:
        """How far the video sent trails the audio received, in seconds."""
        return max(0.0, self.features.seconds - self.sent / self.fps)

    # -- the session's thread -------------------------------------------------------------
    def run(self) -> None:
        try:
            while not self._step():
                pass
        finally:
            self.flight.cancel()
            if self.encoding:
                self.encoding[1].cancel()
            self.writer.close()
            memory.release()
            self.finished.set()

    def _step(self) -> bool:
        """One turn of the loop; True when the session is over."""
        busy = self._read_inbox(timeout=0.005 if (self.flight or self.encoding or self.waiting) else 0.05)
        if busy is CANCEL:
            return True
        self._encode_audio()
        self._submit_frames()
        self._send_ready_frames()
        self._progress()
        if self.features.done and not self.waiting and not self.flight and not self.encoding:
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
                self._take_samples(self.resampler.resample_chunk(np.zeros(0, np.float32), last=True)
                                   if self.resampler else np.zeros(0, np.float32), time.perf_counter())
                self.features.end()
            else:
                when, pcm16 = item
                self._take_pcm(pcm16, when)
            try:
                item = self.inbox.get_nowait()
            except queue.Empty:
                return True

    def _take_pcm(self, pcm16: bytes, when: float) -> None:
        data = self._odd_byte + pcm16
        self._odd_byte = data[len(data) // 2 * 2 :]
        samples = np.frombuffer(data[: len(data) // 2 * 2], "<i2").astype(np.float32) / 32768.0
        if self.resampler:
            samples = self.resampler.resample_chunk(samples)
        self._take_samples(samples, when)

    def _take_samples(self, samples: np.ndarray, when: float) -> None:
        if self.features.ended:
            return
        if self.features.seconds + len(samples) / specs.SAMPLE_RATE > self.options.max_seconds:
            raise LiveTooLong(f"a live session takes at most {self.options.max_seconds:g} s of speech")
        self.features.add(samples)
        self.writer.add_audio(samples)
        self.latencies.arrived(self.features.received, when)

    def _encode_audio(self) -> None:
        """Start an audio_encoder run when it would release frames and generation needs them;
        take its steps when it is back."""
        if self.encoding and self.encoding[1].done():
            covers, future = self.encoding
            self.encoding = None
            started = time.perf_counter()
            self.features.accept(covers, future.result())
            first, windows = self.features.windows()
            if len(windows):
                self.waiting.append((first, windows))
            self.report.audio_features += time.perf_counter() - started
        # Run only when generation is about to run out of frames: a generator that keeps
        # up gets a run every hop; a slow one gets fewer runs, each releasing more frames
        # (bigger batches), so the encoder never takes the CPU the frames need.
        pending = sum(len(w) for _, w in self.waiting) + self.flight.frames
        if self.encoding is None and pending < self.options.batch_size and self.features.due():
            covers, mel = self.features.run_input()
            self.encoding = (covers, self.client.submit(self.client.audio_encoder, mel))
        if self.features.ended and self.encoding is None and not self.features.due():
            first, windows = self.features.windows()  # the frames after the last steps
            if len(windows):
                self.waiting.append((first, windows))

    def _submit_frames(self) -> None:
        while self.waiting and len(self.flight) < self.options.in_flight:
            first, windows = self.waiting.popleft()
            take = windows[: self.options.batch_size]
            if len(take) < len(windows):
                self.waiting.appendleft((first + len(take), windows[len(take) :]))
            self.flight.submit(first, take)

    def _send_ready_frames(self) -> None:
        while self.flight.head_done():
            first, frames = self.flight.next()
            started = time.perf_counter()
            for frame in frames:
                self.writer.write(frame)
            chunk = self.writer.flush()
            self.report.encoding += time.perf_counter() - started
            self.send(chunk)
            now = time.perf_counter()
            for k in range(len(frames)):
                self.latencies.sent(first + k, now)
            self.sent += len(frames)
            if not self.report.first_frame:
                self.report.first_frame = now - self.started

    def _progress(self, force: bool = False) -> None:
        now = time.perf_counter()
        if not force and now - self._last_progress < PROGRESS_EVERY_S:
            return
        self._last_progress = now
        self.send({"type": "progress", "frames": self.sent, "audio_seconds": round(self.features.seconds, 3),
                   "lag_seconds": round(self.lag_s, 3), "latency_ms": self.latencies.summary(),
                   "encoder_runs": self.features.runs})

    def _finish(self) -> None:
        self.send(self.writer.finish({"status": "done", "frames": self.sent}))
        self.report.frames, self.report.audio_seconds = self.sent, round(self.features.seconds, 3)
        self.report.total = time.perf_counter() - self.started
        metrics.observe_generation(self.report, "live")
        self.send({"type": "done", "frames": self.sent, "audio_seconds": round(self.features.seconds, 3),
                   "latency_ms": self.latencies.summary(), "encoder_runs": self.features.runs,
                   "timings": self.report.as_dict()})
