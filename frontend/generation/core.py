"""The generation core: frames' audio windows in, faces from Triton out, in order, composed.

Every way of making video uses it: the whole answer and the streamed answer
(frontend/generation/answers.py), a /ws/live session (live.py) and a
conversational session (frontend/sessions/). Frames go to Triton's `musetalk`
ensemble in batches with several batches in flight, so the server's batcher
stays busy while the front end blends and encodes the faces that came back: a
pipeline, not a loop of round trips. `Utterance` adds the audio that is still
arriving (incremental features, frames released as their audio is heard).
"""
from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FuturesTimeout
from dataclasses import asdict, dataclass, field

import numpy as np

from contract.priority import Priority
from frontend.avatars.store import Avatar
from frontend.live_first import LiveFirst
from frontend.speech.incremental import IncrementalFeatures


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


AGE_AFTER_S = 10.0  # a batch below a session's priority still unanswered this long goes again at it


@dataclass
class Batch:
    """Frames on their way through the ensemble: what was sent, at which priority, when."""

    indices: list[int]
    windows: np.ndarray | None  # kept to send it again (ageing); None where it cannot age
    priority: int
    future: Future
    sent: float = field(default_factory=time.monotonic)


class InFlight:
    """Batches of frames on their way through the ensemble, answered in order.

    `submit` sends a batch (frame indices with their audio windows; frame i takes
    the avatar's latents at cycle position `start + i`) on the client's own
    threads, at a priority in Triton's queues (contract.priority); `next` waits for
    the oldest one. `cancel` cancels every batch on the server too (over gRPC: see
    MuseTalkClient.submit).

    Ageing: Triton serves higher levels first, so a server that live work keeps busy could
    keep an offline batch queued for ever (and its deadline would expire). A batch below a
    session's level that has waited AGE_AFTER_S is cancelled and sent again at the session's
    level, once: offline work always finishes, in its turn among the sessions' frames.
    """

    def __init__(self, avatar: Avatar, client, report: Report, start: int = 0):
        self.avatar, self.client, self.report, self.start = avatar, client, report, start
        self.batches: deque[Batch] = deque()
        self.requests = 0  # sent to Triton
        self.answered = 0  # batches answered
        self.cancelled = 0  # cancelled before their answer came
        self.aged = 0  # sent again at a session's level after waiting AGE_AFTER_S

    def __len__(self) -> int:
        return len(self.batches)

    @property
    def frames(self) -> int:
        """Frames on their way."""
        return sum(len(batch.indices) for batch in list(self.batches))

    def submit(self, indices: Sequence[int], windows: np.ndarray, priority: int = Priority.OFFLINE) -> None:
        future = self._send(list(indices), windows, priority)
        self.batches.append(Batch(list(indices), windows if priority > Priority.SESSION else None, priority, future))

    def _send(self, indices: list[int], windows: np.ndarray, priority: int) -> Future:
        self.requests += 1
        latents = self.avatar.latents[[self.avatar.cycle_index(self.start + i) for i in indices]]
        return self.client.submit(self.client.musetalk, windows, latents, priority=priority)

    def head_done(self) -> bool:
        return bool(self.batches) and self.batches[0].future.done()

    def next(self) -> tuple[list[int], np.ndarray]:
        """(frame indices, faces [k, 256, 256, 3] uint8 BGR) of the oldest batch; waits for it."""
        batch = self.batches[0]
        started = time.perf_counter()
        while True:
            try:
                faces = batch.future.result(timeout=max(0.0, batch.sent + AGE_AFTER_S - time.monotonic())
                                            if batch.priority > Priority.SESSION else None)
                break
            except FuturesTimeout:
                self.age()
        self.report.waiting_for_triton += time.perf_counter() - started
        self.batches.popleft()
        self.answered += 1
        return batch.indices, faces

    def age(self) -> None:
        """Send again, at a session's level, the batches below it that have waited AGE_AFTER_S."""
        now = time.monotonic()
        for batch in self.batches:
            if batch.priority <= Priority.SESSION or now - batch.sent < AGE_AFTER_S:
                continue
            if batch.future.cancel():  # still queued: sent again
                self.aged += 1
                batch.future = self._send(batch.indices, batch.windows, Priority.SESSION)
            batch.priority, batch.sent, batch.windows = Priority.SESSION, now, None

    def cancel(self) -> None:
        """Cancel every batch: on the server too where the transport allows it."""
        for batch in self.batches:
            if batch.future.cancel():
                self.cancelled += 1
        self.batches.clear()


class Composer:
    """An avatar's frames as I420 (the video encoder's input), with generated faces blended in.
    One per video being made (it reads the avatar's frames in cycle order)."""

    def __init__(self, avatar: Avatar, report: Report):
        self.avatar, self.report = avatar, report
        self.reader = None  # opened at the first frame

    def frame(self, position: int, face: np.ndarray | None = None, strength: float = 1.0) -> np.ndarray:
        """The avatar's frame at cycle `position`, with `face` blended at `strength` (0..1)."""
        started = time.perf_counter()
        self.reader = self.reader or self.avatar.reader()
        source = self.avatar.cycle_index(position)
        frame = self.reader.frame(source)
        if face is not None and strength > 0:
            frame = self.avatar.compositor.compose(source, frame, face, strength)
        self.report.blending += time.perf_counter() - started
        return frame

    def close(self) -> None:
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


def composed(avatar: Avatar, windows: np.ndarray, client, report: Report, batch_size: int,
             in_flight: int, ramp: bool = False, priority: int = Priority.OFFLINE,
             live_first: LiveFirst | None = None) -> Iterator[list[np.ndarray]]:
    """The composed frames of every window, batch by batch, in order. With `ramp`, the
    first batch goes alone (nothing merges with it in Triton's batcher: it comes back soonest).
    Offline work gives way to live work (`live_first`): while someone waits for a live frame,
    it sends nothing to Triton and composes nothing."""
    flight, composer = InFlight(avatar, client, report), Composer(avatar, report)
    todo = deque(batches(len(windows), batch_size, ramp))
    live_first = live_first or LiveFirst(enabled=False)
    limit = 1 if ramp else in_flight
    try:
        while todo or flight:
            while todo and len(flight) < limit:
                live_first.give_way()
                start, stop = todo.popleft()
                flight.submit(range(start, stop), windows[start:stop], priority)
            indices, faces = flight.next()
            live_first.give_way()
            yield [composer.frame(i, face) for i, face in zip(indices, faces)]
            limit = in_flight
    finally:
        flight.cancel()  # on errors and abandoned generators: nothing left running
        composer.close()


def write_frames(writer, frames: list[np.ndarray], report: Report, started: float) -> bytes | None:
    """Encode `frames` with `writer`, hand out what a fragmented writer has ready, and time
    the first frame: the one way every answer writes its frames."""
    t = time.perf_counter()
    for frame in frames:
        writer.write(frame)
    chunk = writer.flush()
    report.encoding += time.perf_counter() - t
    report.first_frame = report.first_frame or time.perf_counter() - started
    return chunk


class Utterance:
    """The faces of one utterance while its audio is still arriving.

        audio (16 kHz) -> IncrementalFeatures -- audio_encoder (Triton) -> released windows
          -> InFlight batches -- musetalk ensemble (Triton) -> faces, in order

    Nothing here blocks: the owner's loop calls `step()` (start an encoder run when
    generation is about to run out of frames, take its result, send released frames)
    and takes faces with `next()` while `ready()`. `keep(indices)` may choose which
    released frames need a face (a session skips silent ones); `step(until=k)`
    sends no frame from k on (a session generates only so far ahead of playback).
    `priority()` is the level of its next requests in Triton's queues (contract.priority).
    """

    def __init__(self, avatar: Avatar, client, fps: int, report: Report, batch_size: int = 8,
                 in_flight: int = 3, start: int = 0,
                 keep: Callable[[list[int]], list[bool]] | None = None,
                 priority: Callable[[], int] = lambda: Priority.LIVE):
        self.client, self.report, self.batch_size, self.in_flight = client, report, batch_size, in_flight
        self.priority = priority
        self.features = IncrementalFeatures(fps)
        self.flight = InFlight(avatar, client, report, start)
        self.keep = keep
        self.waiting: deque[tuple[int, np.ndarray]] = deque()  # frames released, not yet sent
        self.encoding: tuple[tuple[int, int], Future] | None = None  # the audio_encoder run in flight
        self.skipped = 0  # frames `keep` said need no face

    # -- input ----------------------------------------------------------------------------
    def add(self, samples_16k: np.ndarray) -> None:
        self.features.add(samples_16k)

    def end(self) -> None:
        self.features.end()

    @property
    def seconds(self) -> float:
        return self.features.seconds

    # -- the loop -------------------------------------------------------------------------
    @property
    def pending(self) -> int:
        """Frames released and not yet answered."""
        return len(self.waiting) + self.flight.frames

    @property
    def busy(self) -> bool:
        """Waiting on Triton (poll often) rather than on audio."""
        return bool(self.flight or self.encoding or self.waiting)

    @property
    def done(self) -> bool:
        """Every frame of the ended utterance has been handed out."""
        return self.features.done and not self.waiting and not self.flight and not self.encoding

    def step(self, until: int | None = None) -> None:
        self._encode_audio()
        self._send_frames(until)
        self.flight.age()

    def ready(self) -> bool:
        return self.flight.head_done()

    def next(self) -> tuple[list[int], np.ndarray]:
        return self.flight.next()

    def cancel(self) -> None:
        self.flight.cancel()
        if self.encoding and self.encoding[1].cancel():
            self.flight.cancelled += 1
        self.encoding = None
        self.waiting.clear()

    def _encode_audio(self) -> None:
        """Start an audio_encoder run when it would release frames and generation needs them;
        take its steps when it is back."""
        if self.encoding and self.encoding[1].done():
            covers, future = self.encoding
            self.encoding = None
            started = time.perf_counter()
            self.features.accept(covers, future.result())
            self._release()
            self.report.audio_features += time.perf_counter() - started
        # Run only when generation is about to run out of frames: a generator that keeps
        # up gets a run every hop; a slow one gets fewer runs, each releasing more frames
        # (bigger batches), so the encoder never takes the compute the frames need.
        if self.encoding is None and self.pending < self.batch_size and self.features.due():
            covers, mel = self.features.run_input()
            self.encoding = (covers, self.client.submit(self.client.audio_encoder, mel, priority=self.priority()))
            self.flight.requests += 1
        if self.features.ended and self.encoding is None and not self.features.due():
            self._release()  # the frames after the last steps

    def _release(self) -> None:
        first, windows = self.features.windows()
        for k in range(len(windows)):
            self.waiting.append((first + k, windows[k]))

    def _send_frames(self, until: int | None) -> None:
        # A ramp: batches of 1, 2, 4, ... frames up to batch_size, at most two in flight (one
        # executing, the next queued behind it, so neither merges with the other in Triton's
        # batcher: the first frames come back soonest, in order); then `in_flight` at once.
        while self.waiting:
            sent = self.flight.answered + len(self.flight)
            size = min(self.batch_size, 2 ** sent)
            if len(self.flight) >= (self.in_flight if size == self.batch_size else min(2, self.in_flight)):
                return
            take = []
            while self.waiting and len(take) < size and (until is None or self.waiting[0][0] < until):
                take.append(self.waiting.popleft())
            if self.keep is not None and take:
                wanted = self.keep([i for i, _ in take])
                self.skipped += len(take) - sum(map(bool, wanted))
                take = [item for item, keep in zip(take, wanted) if keep]
            if not take:
                if self.waiting and until is not None and self.waiting[0][0] >= until:
                    return
                continue
            self.flight.submit([i for i, _ in take], np.stack([w for _, w in take]), self.priority())
