"""Where a session's speech frames go besides its WebRTC viewers: a fragmented MP4 (H.264 + AAC)
handed to a sender, frame by frame and its audio with it. /ws/live is a session whose only output
is this one, sent to its socket (frontend/routes/live.py).

Each frame's latency is counted from when the audio it needs arrived (the audio up to its end,
(k + 1) / fps of the segment) to when the frame was handed to the sender.
"""
from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

import numpy as np

from contract import specs
from frontend import metrics
from frontend.avatars.store import Avatar
from frontend.video.rtc import AUDIO_RATE
from frontend.video.writers import FragmentedMp4Writer

PROGRESS_EVERY_S = 0.5


class Latencies:
    """When each frame's audio arrived, and how long until the frame was sent."""

    def __init__(self, fps: int):
        self.fps = fps
        self.values: list[float] = []

    def sent(self, frame: int, arrivals: deque[tuple[int, float]], when: float) -> None:
        """Frame `frame` left: its audio is the audio up to its end, (frame + 1) / fps."""
        needed = (frame + 1) * specs.SAMPLE_RATE / self.fps
        while len(arrivals) > 1 and arrivals[1][0] < needed:
            arrivals.popleft()  # frames leave in order: older arrivals are never needed again
        for samples, at in arrivals:
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


class Fmp4Out:
    """The session's speech frames as fragmented MP4, with progress messages twice a second and a
    last message when it ends. `send` takes bytes (fMP4) and dicts (messages), in order, from the
    session's thread; it may block (a slow reader holds the session back: nothing is dropped)."""

    def __init__(self, avatar: Avatar, fps: int, send: Callable[[bytes | dict], None], preset: str = "veryfast"):
        width, height = avatar.size
        self.fps, self.send = fps, send
        self.writer = FragmentedMp4Writer(width, height, fps, AUDIO_RATE, preset)
        self.codecs = self.writer.codecs
        self.latencies = Latencies(fps)
        self.frames = 0  # handed to the writer
        self.sent = 0  # flushed to the sender
        self.started = time.perf_counter()
        self.encoding = 0.0
        self._last_progress = 0.0

    def write(self, picture: np.ndarray, audio: np.ndarray) -> None:
        """A speech frame and its audio (48 kHz, exactly the frame's span)."""
        started = time.perf_counter()
        self.writer.add_audio(audio)
        self.writer.write(picture)
        self.frames += 1
        self.encoding += time.perf_counter() - started

    def flush(self, segment) -> None:
        """Hand what is written to the sender (a fragment), and say how far it is now and then."""
        if self.frames > self.sent:
            started = time.perf_counter()
            chunk = self.writer.flush()
            self.encoding += time.perf_counter() - started
            self.send(chunk)
            now = time.perf_counter()
            for k in range(self.sent, self.frames):
                self.latencies.sent(k, segment.arrivals, now)
            self.sent = self.frames
        if segment is not None and time.perf_counter() - self._last_progress >= PROGRESS_EVERY_S:
            self._last_progress = time.perf_counter()
            self.send({"type": "progress", "frames": self.sent, "audio_seconds": round(segment.seconds, 3),
                       "lag_seconds": round(max(0.0, segment.seconds - self.sent / self.fps), 3),
                       "latency_ms": self.latencies.summary(), "encoder_runs": segment.utterance.features.runs})

    def finish(self, segment, tail: np.ndarray) -> None:
        """The segment has played all of it: its audio after the last whole frame, the trailer,
        and the last message."""
        self.flush(segment)
        self.writer.add_audio(tail)
        self.send(self.writer.finish({"status": "done", "frames": self.sent}))
        report = segment.report
        report.frames, report.audio_seconds = self.sent, round(segment.seconds, 3)
        report.encoding, report.total = self.encoding, time.perf_counter() - self.started
        metrics.observe_generation(report, "live")
        self.send({"type": "done", "frames": self.sent, "audio_seconds": round(segment.seconds, 3),
                   "latency_ms": self.latencies.summary(), "encoder_runs": segment.utterance.features.runs,
                   "timings": report.as_dict()})

    def close(self) -> None:
        self.writer.close()
