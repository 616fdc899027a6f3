"""A session's frames as a viewer receives them, and what they show: for the benchmarks and the tests.

The avatar the tiny stack speaks with is a photograph (its idle frame never changes) and random
weights paint noise where the mouth is, so a frame is told to be speech, idle or a repeat by its
pixels alone; each frame keeps when its first RTP packet arrived (client.sessions).
"""
from __future__ import annotations

import asyncio
import time

import httpx
import numpy as np

SPEECH_CHANGE = 12  # a 16x16 block this much brighter or darker, on average: a generated mouth


def blocks_changed(frame: np.ndarray, reference: np.ndarray, block: int = 16) -> float:
    """The largest mean difference of any 16x16 block between two luma planes."""
    h, w = (reference.shape[0] // block) * block, (reference.shape[1] // block) * block
    diff = np.abs(frame[:h, :w].astype(np.int16) - reference[:h, :w])
    return float(diff.reshape(h // block, block, w // block, block).mean(axis=(1, 3)).max())


class Watch:
    """A viewer's frames as they arrive: video (luma, arrival), audio (samples, arrival)."""

    def __init__(self, viewer, keep_video: bool = True):
        self.viewer, self.keep_video = viewer, keep_video
        self.video: list[tuple[np.ndarray | None, float]] = []
        self.decoded: list[float] = []  # when each video frame came out of the receiver's jitter buffer, decoded
        self.audio: list[tuple[np.ndarray, float]] = []
        self.tasks = [asyncio.ensure_future(self._video()), asyncio.ensure_future(self._audio())]

    async def _video(self):
        while (received := await self.viewer.video.get()).frame is not None:
            picture = received.frame.to_ndarray(format="gray") if self.keep_video else None
            self.video.append((picture, received.arrived))
            self.decoded.append(time.monotonic())

    async def _audio(self):
        while (received := await self.viewer.audio.get()).frame is not None:
            self.audio.append((received.frame.to_ndarray().astype(np.float32) / 32768, received.arrived))

    def idle_picture(self) -> np.ndarray:
        return self.video[-1][0]

    def speech_frames(self, idle: np.ndarray, since: float = 0.0) -> list[tuple[int, float]]:
        """(index, arrival) of every frame since `since` that is neither the idle picture nor the
        frame before it again (a hold, while generation catches up)."""
        return [(i, at) for i, (picture, at) in enumerate(self.video)
                if at >= since and blocks_changed(picture, idle) > SPEECH_CHANGE
                and blocks_changed(picture, self.video[i - 1][0]) > 2]

    def gaps(self, idle: np.ndarray, frames: list[tuple[int, float]]) -> list[int]:
        """Frames between the first and the last of `frames` that show the avatar's own face."""
        return [i for i in range(frames[0][0], frames[-1][0]) if blocks_changed(self.video[i][0], idle) <= 12]

    def first_speech_frame(self, idle: np.ndarray, since: float, decoded: bool = False) -> float | None:
        """When the first speech frame since `since` arrived (its first RTP packet), or was decoded."""
        return next(((self.decoded[i] if decoded else at) for i, (picture, at) in enumerate(self.video)
                     if at >= since and blocks_changed(picture, idle) > SPEECH_CHANGE), None)

    def first_idle_frame(self, idle: np.ndarray, since: float) -> float | None:
        return next((at for picture, at in self.video if at >= since and blocks_changed(picture, idle) <= 8), None)

    def first_changed_frame(self, since: float) -> float | None:
        """The first frame from `since` on that differs from the one before it."""
        frames = [(i, at) for i, (_, at) in enumerate(self.video) if at >= since and i > 0]
        return next((at for i, at in frames if blocks_changed(self.video[i][0], self.video[i - 1][0]) > 2), None)

    def audio_onset(self, since: float) -> float | None:
        return next((at for samples, at in self.audio if at >= since and np.abs(samples).max() > 0.02), None)

    def stop(self):
        for task in self.tasks:
            task.cancel()


async def picture_losses(url: str) -> dict[str, int]:
    """The viewers' keyframe requests so far, by what the sessions did with them (/metrics)."""
    async with httpx.AsyncClient() as http:
        text = (await http.get(f"{url}/metrics")).text
    prefix = "musetalk_session_picture_loss_total{"
    return {line[len(prefix):].split('"')[1]: int(float(line.rsplit(" ", 1)[1]))
            for line in text.splitlines() if line.startswith(prefix)}
