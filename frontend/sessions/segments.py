"""A speech segment: one utterance of a session (what a TTS says between two `segment_end`s),
from its PCM to its faces, with the audio each frame plays with.

Frame k of a segment lasts from k / fps to (k + 1) / fps of its audio; there are
floor(seconds x fps) of them. Each frame gets a face strength (alpha, 0..1) from
its audio: MuseTalk's window for frame k hears from 2 frames before it to 2
after (upstream's padding), and a frame whose window is silent (RMS under the
session's threshold) moves alpha towards 0, a frame that hears speech towards 1,
by 1 / transition_frames per frame. So the mouth fades in as speech approaches
(the window hears it 2 frames early), fades out after it, and a frame of alpha 0
shows the avatar's own face with no Triton call at all: MuseTalk's mouth
quivers in silence; the avatar's own frames do not.
"""
from __future__ import annotations

import math
import time
from collections import deque

import numpy as np

from contract import specs
from contract.priority import Priority
from frontend.exceptions import SegmentTooLong
from frontend.generation.core import Report, Utterance
from frontend.speech import audio
from frontend.speech.pcm import EMPTY, Pcm16, Resampler
from frontend.video.rtc import AUDIO_RATE

ENERGY_BLOCK = specs.SAMPLE_RATE // 100  # 10 ms at 16 kHz (half an encoder step): the silence test's resolution


class Segment:
    """Feed it PCM with `add`, close it with `end`; the session's loop calls `step`, and its
    timeline plays frame k once `ready(k)`, with `alpha(k)`, `face(k)` and `take_audio`."""

    def __init__(self, number: int, avatar, client, fps: int, sample_rate: int, start: int, options,
                 alpha_before: float = 0.0):
        self.number, self.fps, self.start, self.options = number, fps, start, options
        self.sample_rate = sample_rate
        self.report = Report(frames=0, fps=fps, audio_seconds=0.0)
        self.utterance = Utterance(avatar, client, fps, self.report, options.batch_size, options.in_flight,
                                   start=start, keep=self._needs_face, priority=self._priority)
        self.pcm = Pcm16()
        self.to_16k, self.to_48k = Resampler(sample_rate, specs.SAMPLE_RATE), Resampler(sample_rate, AUDIO_RATE)
        self.audio = np.zeros(0, np.float32)  # the segment's 48 kHz audio not yet played
        self._energy: list[float] = []  # mean square per 10 ms block at 16 kHz
        self._partial = EMPTY  # 16 kHz samples of the block being filled
        self._alphas: list[float] = []
        self._alpha_before = alpha_before
        self.faces: dict[int, np.ndarray] = {}
        self.first_audio_at: float | None = None
        self.first_frame_at: float | None = None  # when its frame 0 could have played (its face was back)
        self.arrivals: deque[tuple[int, float]] = deque()  # (16 kHz samples received in all, when): latencies
        self.played = 0  # frames played
        self.faces_received = 0
        self.ended = False

    # -- input ----------------------------------------------------------------------------
    def add(self, pcm16: bytes, when: float) -> None:
        self.first_audio_at = self.first_audio_at or when
        samples = self.pcm(pcm16)
        self._take(self.to_16k(samples), self.to_48k(samples))
        self.arrivals.append((self.utterance.features.received, when))

    def end(self) -> None:
        self._take(self.to_16k(EMPTY, last=True), self.to_48k(EMPTY, last=True))
        if len(self._partial):
            self._energy.append(float(np.mean(self._partial ** 2)))
            self._partial = EMPTY
        self.ended = True
        self.utterance.end()

    def _take(self, samples_16k: np.ndarray, samples_48k: np.ndarray) -> None:
        if self.seconds + len(samples_16k) / specs.SAMPLE_RATE > self.options.max_segment_seconds:
            raise SegmentTooLong(f"a speech segment lasts at most {self.options.max_segment_seconds:g} s")
        self.utterance.add(samples_16k)
        self.audio = np.concatenate([self.audio, samples_48k])
        blocks = np.concatenate([self._partial, samples_16k])
        whole = len(blocks) // ENERGY_BLOCK * ENERGY_BLOCK
        self._energy += np.mean(blocks[:whole].reshape(-1, ENERGY_BLOCK) ** 2, axis=1).tolist()
        self._partial = blocks[whole:]

    @property
    def seconds(self) -> float:
        return self.utterance.seconds

    @property
    def frames(self) -> int | None:
        """floor(seconds x fps) once the segment has ended."""
        return self.utterance.features.total_frames

    @property
    def queued_seconds(self) -> float:
        """Audio received and not yet played."""
        return max(0.0, self.seconds - self.played / self.fps)

    # -- generation -----------------------------------------------------------------------
    def step(self, until: int) -> None:
        """Move generation on (never past frame `until`), and keep the faces that came back."""
        self.utterance.step(until)
        while self.utterance.ready():
            indices, faces = self.utterance.next()
            self.faces.update(zip(indices, faces))
            self.faces_received += len(indices)
        if self.first_frame_at is None and self.played == 0 and self.ready_to_start():
            self.first_frame_at = time.monotonic()

    def ready(self, k: int) -> bool:
        """Whether frame k can play now."""
        alpha = self.alpha(k)
        return alpha is not None and (alpha == 0 or k in self.faces)

    def ready_to_start(self) -> bool:
        """Whether it can start: its frames up to the first that shows a face are ready (all of
        them, in a segment without one). A silent frame needs no face and is ready at once: a
        segment that started on its silent first frames alone would hold on the first face while
        it is still coming, and a freeze in speech shows more than a later start. A face first
        starts at once: the ramp's next, smaller batches are right behind it."""
        k = 0
        while self.frames is None or k < self.frames:
            if not self.ready(k):
                return False
            if self.alpha(k) != 0:
                return True
            k += 1
        return True

    def face(self, k: int) -> np.ndarray | None:
        return self.faces.pop(k, None)

    def take_audio(self, count: int | None) -> np.ndarray:
        """The next `count` samples of its 48 kHz audio (all that is left: None). Played audio is
        dropped: memory stays the queue's. The timeline takes each tick's length of the session's
        clock, so no sample is lost or repeated at any fps."""
        out, self.audio = (self.audio, self.audio[:0]) if count is None else (self.audio[:count], self.audio[count:])
        return out

    def cancel(self) -> None:
        self.utterance.cancel()
        self.faces.clear()

    # -- faces and silence ----------------------------------------------------------------
    def alpha(self, k: int) -> float | None:
        """Frame k's face strength, once its audio window has been heard (else None)."""
        while len(self._alphas) <= k:
            j = len(self._alphas)
            voiced = self._voiced(j)
            if voiced is None:
                return None
            before = self._alphas[-1] if self._alphas else self._alpha_before
            step = 1.0 / max(1, self.options.transition_frames)
            self._alphas.append(min(1.0, before + step) if voiced else max(0.0, before - step))
        return self._alphas[k]

    def _voiced(self, k: int) -> bool | None:
        """Whether frame k's audio window (the 10 encoder steps MuseTalk gives it) hears speech;
        None while that audio has not all arrived."""
        first, stop = self._window_blocks(k)
        if len(self._energy) < stop and not self.ended:
            return None
        if self.options.silence_dbfs is None:
            return True
        window = self._energy[max(0, first) : stop]
        return bool(window) and 10 * math.log10(max(float(np.mean(window)), 1e-12)) > self.options.silence_dbfs

    def _window_blocks(self, k: int) -> tuple[int, int]:
        """The 10 ms blocks of frame k's window: steps floor(k x 50 / fps) - left .. + 10 (20 ms each)."""
        multiplier = specs.AUDIO_STEPS_PER_SECOND / self.fps
        first_step = math.floor(k * multiplier) - math.ceil(multiplier) * audio.PAD_LEFT
        return 2 * first_step, 2 * (first_step + specs.CHUNK_STEPS)

    def _priority(self) -> Priority:
        """Until it plays, someone is waiting to see it speak: its requests go before everything
        else in Triton's queues; once it plays, it is ahead of its playback (ahead_seconds)."""
        return Priority.SEGMENT_START if self.played == 0 else Priority.SESSION

    def _needs_face(self, indices: list[int]) -> list[bool]:
        alphas = [self.alpha(k) for k in indices]
        return [alpha is None or alpha > 0 for alpha in alphas]


def span(n: int, fps: int) -> tuple[int, int]:
    """The 48 kHz samples of frame (or tick) n: [round(n x 48000 / fps), round((n + 1) x 48000 / fps))."""
    return round(n * AUDIO_RATE / fps), round((n + 1) * AUDIO_RATE / fps)
