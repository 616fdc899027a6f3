"""Speech + avatar -> video: the per-request generation pipeline.

Frames go to Triton's `musetalk` ensemble in batches with several batches in
flight, so the server's batcher stays busy while the front end blends and
encodes the faces that came back: a pipeline, not a loop of round trips.

Two answers share it: `generate` (the whole mp4 at the end) and `stream`
(fragmented MP4 while frames are made). Streaming starts with small batches,
1 then 2, 4, 8 ... up to the configured batch, the first one alone: the first
fragment leaves after one frame's generation, while the steady state keeps the
big batches the dynamic batcher needs for throughput.
"""
from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import asdict, dataclass

import numpy as np

from frontend import audio, memory, metrics
from frontend.avatars import Avatar
from frontend.video import FragmentedMp4Writer, Mp4Writer, aac_input

log = logging.getLogger("musetalk.frontend")


@dataclass
class Report:
    """What one generation cost, stage by stage (seconds)."""

    frames: int
    fps: int
    audio_seconds: float
    audio_features: float = 0.0  # log-mel + audio_encoder on Triton + per-frame windows
    waiting_for_triton: float = 0.0  # blocked on the ensemble: time the front end idled
    blending: float = 0.0  # the avatar's frame decoded, the face blended in
    encoding: float = 0.0
    first_frame: float = 0.0  # from the start until the first frame was encoded
    total: float = 0.0

    @property
    def frames_per_second(self) -> float:
        return self.frames / self.total if self.total else 0.0

    def as_dict(self) -> dict:
        return {**{k: round(v, 4) if isinstance(v, float) else v for k, v in asdict(self).items()},
                "frames_per_second": round(self.frames_per_second, 3)}


class InFlight:
    """Batches of frames on their way through the ensemble, answered in order.

    `submit` sends a batch (audio windows with their avatar frames' latents) on
    the client's own threads; `next` waits for the oldest one and composes its
    frames. Used by whole answers, streamed answers and live sessions alike.
    """

    def __init__(self, avatar: Avatar, client, report: Report):
        self.avatar, self.client, self.report = avatar, client, report
        self.batches: deque[tuple[int, int, Future]] = deque()  # (first frame, frames, faces)
        self.reader = None  # the avatar's frames, opened at the first face

    def __len__(self) -> int:
        return len(self.batches)

    @property
    def frames(self) -> int:
        """Frames on their way."""
        return sum(n for _, n, _ in self.batches)

    def submit(self, first: int, windows: np.ndarray) -> None:
        sources = [self.avatar.cycle_index(i) for i in range(first, first + len(windows))]
        future = self.client.submit(self.client.musetalk, windows, self.avatar.latents[sources])
        self.batches.append((first, len(windows), future))

    def head_done(self) -> bool:
        return bool(self.batches) and self.batches[0][2].done()

    def next(self) -> tuple[int, list[np.ndarray]]:
        """(first frame index, composed I420 frames) of the oldest batch; waits for it."""
        first, _, future = self.batches.popleft()
        started = time.perf_counter()
        faces = future.result()
        self.report.waiting_for_triton += time.perf_counter() - started
        started = time.perf_counter()
        self.reader = self.reader or self.avatar.reader()
        frames = []
        for k, face in enumerate(faces):
            source = self.avatar.cycle_index(first + k)
            frames.append(self.avatar.compositor.compose(source, self.reader.frame(source), face))
        self.report.blending += time.perf_counter() - started
        return first, frames

    def cancel(self) -> None:
        """Drop every batch (those not started yet are cancelled, the rest finish unseen)
        and close the avatar's frames."""
        for _, _, future in self.batches:
            future.cancel()
        self.batches.clear()
        if self.reader:
            self.reader.close()
            self.reader = None


def batches(n_frames: int, batch_size: int, ramp: bool = False) -> list[tuple[int, int]]:
    """(start, stop) of each batch; with `ramp` the sizes go 1, 2, 4, ... up to batch_size."""
    out, start, size = [], 0, 1 if ramp else batch_size
    while start < n_frames:
        out.append((start, min(start + size, n_frames)))
        start, size = start + size, min(2 * size, batch_size)
    return out


def frame_windows(speech: audio.Speech, fps: int, client, report: Report) -> np.ndarray:
    """Every frame's audio window: log-mel, audio_encoder on Triton, upstream's windowing."""
    started = time.perf_counter()
    hidden = client.audio_encoder(audio.mel_segments(speech.samples_16k))
    windows = audio.frame_windows(hidden, speech.seconds, fps)
    report.audio_features = time.perf_counter() - started
    return windows


def start_report(speech: audio.Speech, fps: int) -> Report:
    n_frames = audio.frame_count(speech.seconds, fps)
    if n_frames < 1:
        raise audio.AudioError(f"the audio lasts {speech.seconds:.3f} s: shorter than one frame at {fps} fps")
    return Report(frames=n_frames, fps=fps, audio_seconds=round(speech.seconds, 3))


def composed(avatar: Avatar, windows: np.ndarray, client, report: Report, batch_size: int,
             in_flight: int, ramp: bool = False) -> Iterator[tuple[int, list[np.ndarray]]]:
    """(first frame, composed frames) per batch, in order. With `ramp`, the first batch
    goes alone (nothing merges with it in Triton's batcher: it comes back soonest)."""
    queue = InFlight(avatar, client, report)
    todo = deque(batches(len(windows), batch_size, ramp))
    limit = 1 if ramp else in_flight
    try:
        while todo or queue:
            while todo and len(queue) < limit:
                start, stop = todo.popleft()
                queue.submit(start, windows[start:stop])
            yield queue.next()
            limit = in_flight
    finally:
        queue.cancel()  # on errors and abandoned generators: what has not started never runs


def generate(avatar: Avatar, speech: audio.Speech, fps: int, client, batch_size: int = 16,
             in_flight: int = 4, encode: bool = True, preset: str = "veryfast",
             ) -> tuple[bytes | None, Report]:
    """Generate every frame; return the mp4's bytes (None if `encode` is False) and timings."""
    started = time.perf_counter()
    report = start_report(speech, fps)
    windows = frame_windows(speech, fps, client, report)
    width, height = avatar.size
    writer = Mp4Writer(width, height, fps, speech.original, speech.original_rate, preset) if encode else None
    try:
        for _, frames in composed(avatar, windows, client, report, batch_size, in_flight):
            if writer is not None:
                t = time.perf_counter()
                for frame in frames:
                    writer.write(frame)
                report.encoding += time.perf_counter() - t
            report.first_frame = report.first_frame or time.perf_counter() - started
        data = None
        if writer is not None:
            t = time.perf_counter()
            data = writer.finish()
            report.encoding += time.perf_counter() - t
    except BaseException:
        if writer is not None:
            writer.close()
        raise
    finally:
        memory.release()  # the frames this video decoded, composed and encoded
    report.total = time.perf_counter() - started
    metrics.observe_generation(report, "whole")
    return data, report


def stream(avatar: Avatar, speech: audio.Speech, fps: int, client, batch_size: int = 16,
           in_flight: int = 4, preset: str = "veryfast") -> Iterator[bytes]:
    """Fragmented MP4 as the frames are made: the init segment with the first fragment,
    one fragment per batch, and a trailer box with the status and timings. An error
    after the first byte ends the stream with an error trailer (the frames made stay
    playable); one before it is raised, for the usual JSON answer."""
    started = time.perf_counter()
    report = start_report(speech, fps)
    windows = frame_windows(speech, fps, client, report)
    width, height = avatar.size
    track, rate = aac_input(speech.original, speech.original_rate)
    writer = FragmentedMp4Writer(width, height, fps, rate, preset)
    writer.add_audio(track)
    written = 0
    metrics.STREAMS.inc()
    try:
        for _, frames in composed(avatar, windows, client, report, batch_size, in_flight, ramp=True):
            t = time.perf_counter()
            for frame in frames:
                writer.write(frame)
            chunk = writer.flush()
            report.encoding += time.perf_counter() - t
            report.first_frame = report.first_frame or time.perf_counter() - started
            written += len(frames)
            yield chunk
        report.total = time.perf_counter() - started
        metrics.observe_generation(report, "stream")
        yield writer.finish({"status": "done", **report.as_dict()})
    except Exception as error:  # noqa: BLE001 - the stream ends with the reason
        metrics.triton_error(error)
        if not written:
            raise
        log.error("streamed generation failed after %d of %d frames: %s", written, report.frames, error)
        yield writer.finish({"status": "error", "error": str(error), "frames": written,
                             "frames_expected": report.frames})
    finally:
        metrics.STREAMS.dec()
        writer.close()
        memory.release()
