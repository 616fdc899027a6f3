"""Speech + avatar -> video: the per-request generation pipeline.

Frames go to Triton's `musetalk` ensemble in batches with several batches in
flight, so the server's batcher stays busy while the front end blends and
encodes the faces that came back: a pipeline, not a loop of round trips.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import asdict, dataclass

import numpy as np

from frontend import audio
from frontend.avatars import Avatar
from frontend.video import Mp4Writer


@dataclass
class Report:
    """What one generation cost, stage by stage (seconds)."""

    frames: int
    fps: int
    audio_seconds: float
    audio_features: float = 0.0  # log-mel + audio_encoder on Triton + per-frame windows
    waiting_for_triton: float = 0.0  # blocked on the ensemble: time the front end idled
    blending: float = 0.0
    encoding: float = 0.0
    total: float = 0.0

    @property
    def frames_per_second(self) -> float:
        return self.frames / self.total if self.total else 0.0

    def as_dict(self) -> dict:
        return {**asdict(self), "frames_per_second": round(self.frames_per_second, 3)}


def generate(avatar: Avatar, speech: audio.Speech, fps: int, client, batch_size: int = 16,
             in_flight: int = 4, encode: bool = True, preset: str = "veryfast",
             ) -> tuple[bytes | None, Report]:
    """Generate every frame; return the mp4's bytes (None if `encode` is False) and timings."""
    started = time.perf_counter()
    n_frames = audio.frame_count(speech.seconds, fps)
    if n_frames < 1:
        raise audio.AudioError(f"the audio lasts {speech.seconds:.3f} s: shorter than one frame at {fps} fps")
    report = Report(frames=n_frames, fps=fps, audio_seconds=round(speech.seconds, 3))

    hidden = client.audio_encoder(audio.mel_segments(speech.samples_16k))
    windows = audio.frame_windows(hidden, speech.seconds, fps)
    report.audio_features = time.perf_counter() - started

    width, height = avatar.size
    writer = Mp4Writer(width, height, fps, speech.original, speech.original_rate, preset) \
        if encode else None
    sources = np.array([avatar.cycle_index(i) for i in range(n_frames)])
    starts = range(0, n_frames, batch_size)

    def submit(start: int):
        part = slice(start, start + batch_size)
        return start, client.submit(client.musetalk, windows[part], avatar.latents[sources[part]])

    pending: deque = deque()
    queued = iter(starts[in_flight:])
    try:
        pending.extend(submit(s) for s in starts[:in_flight])
        while pending:
            start, future = pending.popleft()
            t = time.perf_counter()
            faces = future.result()
            report.waiting_for_triton += time.perf_counter() - t
            next_start = next(queued, None)
            if next_start is not None:
                pending.append(submit(next_start))
            for offset, face in enumerate(faces):
                t = time.perf_counter()
                frame = avatar.compositor.compose(int(sources[start + offset]), face)
                report.blending += time.perf_counter() - t
                if writer is not None:
                    t = time.perf_counter()
                    writer.write(frame)
                    report.encoding += time.perf_counter() - t
        data = None
        if writer is not None:
            t = time.perf_counter()
            data = writer.finish()
            report.encoding += time.perf_counter() - t
    except BaseException:
        for _, future in pending:
            future.cancel()  # what has not started yet; the rest finishes on its own
        if writer is not None:
            writer.close()
        raise
    report.total = time.perf_counter() - started
    for name in ("audio_features", "waiting_for_triton", "blending", "encoding", "total"):
        setattr(report, name, round(getattr(report, name), 4))
    return data, report
