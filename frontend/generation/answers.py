"""POST /onnx-infer's two answers from the generation core: the whole mp4, or fragmented MP4
while the frames are made.

Streaming starts with small batches, 1 then 2, 4, 8 ... up to the configured
batch, the first one alone: the first fragment leaves after one frame's
generation, while the steady state keeps the big batches the dynamic batcher
needs for throughput.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from concurrent.futures import TimeoutError as FuturesTimeout

import numpy as np

from contract.priority import Priority
from frontend import memory, metrics
from frontend.avatars.store import Avatar
from frontend.generation.core import AGE_AFTER_S, Report, composed, write_frames
from frontend.live_first import LiveFirst
from frontend.speech import audio
from frontend.video.writers import FragmentedMp4Writer, Mp4Writer, aac_input

log = logging.getLogger(__name__)


def frame_windows(speech: audio.Speech, fps: int, client, report: Report,
                  live_first: LiveFirst | None = None) -> audio.FrameWindows:
    """Every frame's audio window, made batch by batch: log-mel, audio_encoder on Triton,
    upstream's windowing. One 30 s segment per request, each after giving way to live work: on a
    CPU an execution cannot be interrupted, and a session's segment that starts meanwhile waits
    for at most one of them."""
    started = time.perf_counter()
    live_first = live_first or LiveFirst(enabled=False)
    hidden = []
    for segment in audio.mel_segments(speech.samples_16k):
        live_first.give_way()
        hidden.append(_encoded(client, segment[None]))
    windows = audio.FrameWindows(np.concatenate(hidden), speech.seconds, fps)
    report.audio_features = time.perf_counter() - started
    return windows


def _encoded(client, mel: np.ndarray) -> np.ndarray:
    """The audio encoder's answer at the offline level; kept waiting by live work, once more at a
    session's level (ageing, as core.InFlight's)."""
    future = client.submit(client.audio_encoder, mel, priority=Priority.OFFLINE)
    try:
        return future.result(timeout=AGE_AFTER_S)
    except FuturesTimeout:
        return client.audio_encoder(mel, priority=Priority.SESSION) if future.cancel() else future.result()


def start_report(speech: audio.Speech, fps: int) -> Report:
    n_frames = audio.frame_count(speech.seconds, fps)
    if n_frames < 1:
        raise audio.AudioError(f"the audio lasts {speech.seconds:.3f} s: shorter than one frame at {fps} fps")
    return Report(frames=n_frames, fps=fps, audio_seconds=round(speech.seconds, 3))


def generate(avatar: Avatar, speech: audio.Speech, fps: int, client, batch_size: int = 16,
             in_flight: int = 4, encode: bool = True, preset: str = "veryfast",
             live_first: LiveFirst | None = None) -> tuple[bytes | None, Report]:
    """Generate every frame; return the mp4's bytes (None if `encode` is False) and timings.
    It gives way to live work (`live_first`: frontend/live_first.py)."""
    started = time.perf_counter()
    report = start_report(speech, fps)
    windows = frame_windows(speech, fps, client, report, live_first)
    width, height = avatar.size
    writer = Mp4Writer(width, height, fps, speech.original, speech.original_rate, preset) if encode else None
    try:
        for frames in composed(avatar, windows, client, report, batch_size, in_flight, live_first=live_first):
            if writer is None:
                report.first_frame = report.first_frame or time.perf_counter() - started
            else:
                write_frames(writer, frames, report, started)
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
           in_flight: int = 4, preset: str = "veryfast", on_end=lambda: None,
           live_first: LiveFirst | None = None) -> Iterator[bytes]:
    """Fragmented MP4 as the frames are made: the init segment with the first fragment,
    one fragment per batch, and a trailer box with the status and timings. An error
    after the first byte ends the stream with an error trailer (the frames made stay
    playable); one before it is raised, for the usual JSON answer. `on_end()` runs when
    the stream ends, whichever way (finished, failed, or closed by a client that left)."""
    try:
        yield from _stream(avatar, speech, fps, client, batch_size, in_flight, preset, live_first)
    finally:
        on_end()


def _stream(avatar: Avatar, speech: audio.Speech, fps: int, client, batch_size: int, in_flight: int,
            preset: str, live_first: LiveFirst | None) -> Iterator[bytes]:
    started = time.perf_counter()
    report = start_report(speech, fps)
    windows = frame_windows(speech, fps, client, report, live_first)
    width, height = avatar.size
    track, rate = aac_input(speech.original, speech.original_rate)
    writer = FragmentedMp4Writer(width, height, fps, rate, preset)
    writer.add_audio(track)
    written = 0
    metrics.STREAMS.inc()
    try:
        for frames in composed(avatar, windows, client, report, batch_size, in_flight, ramp=True,
                               live_first=live_first):
            chunk = write_frames(writer, frames, report, started)
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
