"""A conversational session: one avatar, always on screen, on one clock.

The session has a clock that ticks at its fps from its creation to its end.
Every tick is one video frame and its 1/fps seconds of audio, for every viewer:

    idle        the avatar's own frame at the current cycle position, silence:
                no Triton call, and usually no encoding either (frontend/sessions/idle.py)
    speech      frame k of the playing segment: the avatar's frame with the generated
                face blended in (at its alpha, frontend/sessions/segments.py), and
                the segment's audio of frame k
    transition  after speech ends or is interrupted: the last face fading out over
                `transition_frames` frames, silence
    hold        speech whose next frame is not generated yet: the last frame again and
                silence; speech video and its audio wait together, never apart

Frame n and the audio of frame n carry the same clock time (n / fps, and sample
n x 48000 / fps) and leave at that time (frontend/sessions/viewers.py), so a
player's lip sync holds over hours: nothing is estimated, every timestamp is
counted. If the session's thread falls behind by more than REBASE_S, the clock
moves for both tracks together.

The avatar's cycle position advances with every tick but holds. A segment starts
at a position chosen when its audio begins (the current one plus how long frame 0
is expected to take, measured on earlier segments), and its frame k uses the
latents of position start + k, so speech begins where the idle cycle is (no jump)
and a segment queued behind another continues it without a gap.

One thread per session runs everything but the network: reading its inbox
(speech, segment ends, interrupts), moving generation on (non-blocking), and
producing each tick LEAD_S before it is due. `interrupt` cancels the queued
speech and its Triton requests (queued and in flight) at once.
"""
from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from client.errors import TritonClientError
from frontend import memory, metrics
from frontend.avatars.store import Avatar
from frontend.generation.core import Composer, Report
from frontend.sessions.idle import IdleCycles
from frontend.sessions.segments import Segment, SegmentTooLong, span
from frontend.video.rtc import AUDIO_RATE, EncodedFrame, OpusEncoder, VideoEncoder

log = logging.getLogger("musetalk.frontend")

LEAD_S = 0.02  # a tick is produced this long before it is due (its encoding fits in it)
PICTURE_LOSS_INTERVAL_S = 1.0  # at most one keyframe a second for viewers' picture-loss reports
REBASE_S = 0.25  # a tick later than this moves the clock, for both tracks: no burst of late frames
POLL_S = 0.005  # how often generation is looked at while Triton has work of the session's
INTERRUPT_FADE_STEP = 0.5  # an interrupted face fades out in at most two frames: barge-in is seen at once
PROGRESS_EVERY_S = 0.5
CLOSE, END, INTERRUPT = object(), object(), object()


@dataclass(frozen=True)
class SessionOptions:
    fps: int = 25
    batch_size: int = 8  # frames per ensemble request at most
    in_flight: int = 3  # requests in flight per segment
    transition_frames: int = 3  # idle <-> speech fades, and alpha's step inside speech
    silence_dbfs: float | None = -50.0  # a frame whose window is quieter shows the avatar's own face
    ahead_seconds: float = 2.0  # generation runs at most this far ahead of playback
    max_segment_seconds: float = 600.0
    video_kbps: int = 1500
    keyframe_seconds: float = 2.0  # live-encoded video: a keyframe at least this often
    start_lead_seconds: float = 0.3  # first guess of how long a segment's frame 0 takes (then measured)


@dataclass
class Tick:
    n: int
    position: int  # the avatar's cycle position shown
    kind: str  # idle, speech, transition, hold
    audio: np.ndarray  # 48 kHz samples of this tick
    face: np.ndarray | None = None
    strength: float = 0.0


class Latency:
    """Recent figures of one kind (milliseconds), as p50/p95."""

    def __init__(self, keep: int = 200):
        self.values: deque[float] = deque(maxlen=keep)

    def add(self, seconds: float) -> None:
        self.values.append(seconds * 1000)

    def summary(self) -> dict:
        if not self.values:
            return {"count": 0}
        ms = np.array(self.values)
        return {"count": len(ms), "p50": round(float(np.percentile(ms, 50)), 1),
                "p95": round(float(np.percentile(ms, 95)), 1), "last": round(float(ms[-1]), 1)}


class Clock:
    """When tick n is due (time.monotonic), and where its audio lies on the 48 kHz timeline."""

    def __init__(self, fps: int):
        self.fps = fps
        self.t0 = time.monotonic() + 0.05
        self.rebased = 0

    def due(self, n: int) -> float:
        return self.t0 + n / self.fps

    def due_sample(self, sample: int) -> float:
        return self.t0 + sample / AUDIO_RATE

    def rebase(self, n: int, now: float) -> None:
        """Make tick n due now: every later frame and sample moves with it."""
        self.t0, self.rebased = now - n / self.fps, self.rebased + 1


class VideoOut:
    """One codec's video for every viewer that uses it: the idle cycle's packets replayed, or
    frames encoded live (a keyframe first whenever the replay is left, or a viewer asks)."""

    def __init__(self, codec: str, avatar: Avatar, options: SessionOptions, idle_cycles: IdleCycles):
        width, height = avatar.size
        self.codec, self.avatar, self.fps, self.idle_cycles = codec, avatar, options.fps, idle_cycles
        self.encoder = VideoEncoder(codec, width, height, options.fps, options.video_kbps,
                                    keyframe_interval=max(1, round(options.keyframe_seconds * options.fps)))
        self.replaying = False
        self.keyframe_wanted = True
        self.last_loss_keyframe = 0.0  # when a keyframe last answered a picture loss (time.monotonic)

    def frame(self, tick: Tick, picture: Callable[[], np.ndarray]) -> EncodedFrame:
        if tick.kind == "idle" and not self.keyframe_wanted:
            cycle = self.idle_cycles.get(self.avatar, self.codec, self.fps)
            if cycle is not None:
                packet = cycle.at(tick.position)
                if self.replaying or packet.keyframe:  # the replay starts at one of its keyframes
                    self.replaying = True
                    return packet
        keyframe = self.keyframe_wanted or self.replaying  # the decoder holds the replay's pictures
        self.replaying = self.keyframe_wanted = False
        return self.encoder.encode(picture(), keyframe)

    def close(self) -> None:
        self.encoder.close()


class Session:
    """`speak`, `segment_end`, `interrupt`, the viewer and listener methods and `close` may be
    called from any thread; everything else runs on the session's own thread."""

    def __init__(self, session_id: str, avatar: Avatar, client, options: SessionOptions, idle_cycles: IdleCycles):
        self.id, self.avatar, self.client, self.options = session_id, avatar, client, options
        self.idle_cycles = idle_cycles
        self.fps = options.fps
        self.clock = Clock(self.fps)
        self.tick = 0  # the next tick to produce
        self.position = 0  # the avatar's cycle position of the next tick
        self.segments: deque[Segment] = deque()  # the head plays (or waits for its start)
        self.segment_count = 0
        self.alpha, self.last_face = 0.0, None  # the face strength and face of the last tick (for fades)
        self.fade_step = 1.0 / max(1, options.transition_frames)  # alpha's step down per frame, after speech
        self.shown: Tick | None = None  # the last tick (a hold shows it again)
        self.last_picture: tuple[int, np.ndarray] | None = None  # (tick, its composed frame)
        self.carry = np.zeros(0, np.float32)  # a finished segment's audio after its last frame
        # How long recent segments' frame 0 took to be ready: a new segment starts that far ahead
        # in the cycle (the quickest of them: arriving later means a brief hold, never a jump).
        self.first_frame_seconds: deque[float] = deque([options.start_lead_seconds], maxlen=8)
        self.composer = Composer(avatar, Report(frames=0, fps=self.fps, audio_seconds=0.0))
        self.opus = OpusEncoder()
        # Packets produced, waiting for their time: (due, ("video", frame n, {codec: packet}) or
        # ("audio", sample, packet)). The session hands them to its viewers when they are due.
        self.outgoing: deque[tuple[float, tuple]] = deque()
        self.outs: dict[str, VideoOut] = {}
        self.inbox: queue.Queue = queue.Queue()
        self._viewers: dict[str, object] = {}
        self._listeners: list[Callable[[dict, float], None]] = []
        self.speaker = None  # the speech socket connected now (one at a time)
        self._lock = threading.Lock()
        self.created = time.time()
        self.last_activity = time.monotonic()
        self.queued_seconds = 0.0  # speech received and not yet played (read by the speech route)
        self.behind_seconds = 0.0  # how long the playing segment has waited for its frames
        self.state = "idle"
        self.counts = dict.fromkeys(("idle", "speech", "transition", "hold"), 0)
        self.frames_sent = 0
        self.triton = {"requests": 0, "cancelled": 0, "faces": 0, "silent_frames": 0}
        self.segments_played = self.segments_interrupted = 0
        self.speech_start, self.interrupt_latency = Latency(), Latency()
        self._interrupted_at: float | None = None
        self._last_progress = 0.0
        self.error: str | None = None
        self.closed = threading.Event()
        self.thread = threading.Thread(target=self.run, name=f"session-{session_id}", daemon=True)

    # -- called from other threads --------------------------------------------------------
    def speak(self, pcm16: bytes, sample_rate: int) -> None:
        self.inbox.put((time.monotonic(), sample_rate, pcm16))

    def segment_end(self) -> None:
        self.inbox.put(END)

    def interrupt(self) -> None:
        self.inbox.put((INTERRUPT, time.monotonic()))

    def close(self) -> None:
        self.inbox.put(CLOSE)

    def add_viewer(self, viewer_id: str, viewer) -> None:
        with self._lock:
            self._viewers[viewer_id] = viewer
        metrics.SESSION_VIEWERS.inc()
        self.want_keyframe(viewer.codec)

    def remove_viewer(self, viewer_id: str):
        """The viewer, no longer fed (None if it was not one of this session's)."""
        with self._lock:
            viewer = self._viewers.pop(viewer_id, None)
        if viewer is not None:
            metrics.SESSION_VIEWERS.dec()
        return viewer

    @property
    def viewers(self) -> list:
        with self._lock:
            return list(self._viewers.values())

    def viewer(self, viewer_id: str):
        with self._lock:
            return self._viewers.get(viewer_id)

    def want_keyframe(self, codec: str) -> None:
        """A viewer joined: the next frame of its codec is a keyframe."""
        out = self.outs.get(codec)
        if out is not None:
            out.keyframe_wanted = True

    def picture_lost(self, codec: str) -> None:
        """A viewer lost its picture (PLI/FIR). While the idle replay plays, its next keyframe (at
        most its GOP away) answers it: a live keyframe would take the session off the replay, and
        every viewer of the codec onto live encoding, for up to that long. Otherwise a keyframe, at
        most one a second: a receiver that cannot keep up asks again and again, and answering
        each request would load the encoder when the network or the viewer is already struggling."""
        out = self.outs.get(codec)
        if out is None:
            return
        now = time.monotonic()
        if out.replaying:
            result = "replay"
        elif now - out.last_loss_keyframe < PICTURE_LOSS_INTERVAL_S:
            result = "throttled"
        else:
            out.keyframe_wanted, out.last_loss_keyframe, result = True, now, "keyframe"
        metrics.SESSION_PICTURE_LOSS.labels(result).inc()

    def listen(self, notify: Callable[[dict, float], None]) -> None:
        """`notify(event, at)` gets every speech event, `at` being when (time.monotonic) it happens."""
        with self._lock:
            self._listeners.append(notify)

    def unlisten(self, notify: Callable[[dict, float], None]) -> None:
        with self._lock:
            if notify in self._listeners:
                self._listeners.remove(notify)

    def idle_for(self) -> float:
        """Seconds without a viewer, a listener or speech."""
        return time.monotonic() - self.last_activity

    def status(self) -> dict:
        return {
            "id": self.id, "avatar_id": self.avatar.id, "fps": self.fps, "state": self.state,
            "width": self.avatar.size[0], "height": self.avatar.size[1],
            "frames_sent": self.frames_sent, "viewers": len(self.viewers), "created": round(self.created, 3),
            "seconds": round(self.tick / self.fps, 3), "clock_rebased": self.clock.rebased,
            "queued_seconds": round(self.queued_seconds, 3), "behind_seconds": round(self.behind_seconds, 3),
            "segments": {"played": self.segments_played, "interrupted": self.segments_interrupted,
                         "queued": len(self.segments)},
            "frames": dict(self.counts), "triton": dict(self.triton),
            "latency_ms": {"speech_start": self.speech_start.summary(),
                           "interrupt": self.interrupt_latency.summary()},
            "idle_cycle_replayed": {codec: out.replaying for codec, out in dict(self.outs).items()},
            "error": self.error,
        }

    # -- the session's thread -------------------------------------------------------------
    def start(self) -> Session:
        self.thread.start()
        return self

    def run(self) -> None:
        try:
            while True:
                produce = self.clock.due(self.tick) - LEAD_S
                now = time.monotonic()
                if now >= produce:
                    if now > produce + REBASE_S:
                        self.clock.rebase(self.tick, now)
                    self._produce()
                    continue
                if self.outgoing and now >= self.outgoing[0][0]:
                    self._publish(now)
                    continue
                wake = min(produce, self.outgoing[0][0]) if self.outgoing else produce
                busy = any(s.utterance.busy for s in list(self.segments)[:2])
                if self._read_inbox(min(wake - now, POLL_S) if busy else wake - now) is CLOSE:
                    return
                self._generate()
        except Exception as error:  # noqa: BLE001 - the session ends; its speech socket says why
            self.error = f"{type(error).__name__}: {error}"
            log.exception("session %s failed", self.id)
            metrics.triton_error(error)
            self._emit({"type": "error", "error": self.error}, time.monotonic())
        finally:
            for segment in self.segments:
                self._count_triton(segment)
                segment.cancel()
            self.segments.clear()
            self.composer.close()
            self.opus.close()
            for out in self.outs.values():
                out.close()
            for viewer in self.viewers:
                viewer.end()
            self._emit({"type": "session_ended", "id": self.id}, time.monotonic())
            memory.release()
            self.closed.set()

    # -- speech in ------------------------------------------------------------------------
    def _read_inbox(self, timeout: float):
        try:
            item = self.inbox.get(timeout=max(0.0, timeout))
        except queue.Empty:
            return None
        while True:
            if item is CLOSE:
                return CLOSE
            if item is END:
                if self.segments and not self.segments[-1].ended:
                    self.segments[-1].end()
            elif item[0] is INTERRUPT:
                self._interrupt(item[1])
            else:
                when, rate, pcm16 = item
                segment = self._open_segment(rate, when)
                try:
                    segment.add(pcm16, when)
                except SegmentTooLong as error:  # it plays what it has; the speech socket closes
                    segment.end()
                    self._emit({"type": "error", "segment": segment.number, "error": str(error), "status": 413},
                               time.monotonic())
            try:
                item = self.inbox.get_nowait()
            except queue.Empty:
                return None

    def _open_segment(self, sample_rate: int, when: float) -> Segment:
        """The segment this audio belongs to: the last one if it has not ended, else a new one."""
        if self.segments and not self.segments[-1].ended:
            return self.segments[-1]
        if self.segments:  # contiguous: it starts where the last queued segment ends
            last = self.segments[-1]
            start, alpha = last.start + last.frames, last.alpha(last.frames - 1) if last.frames else 0.0
        else:  # after idle: where the cycle will be when its frame 0 is expected (if later, it holds)
            start, alpha = self.position + math.floor(min(self.first_frame_seconds) * self.fps), 0.0
        self.segment_count += 1
        segment = Segment(self.segment_count, self.avatar, self.client, self.fps, sample_rate, start, self.options,
                          alpha_before=alpha or 0.0)
        self.segments.append(segment)
        return segment

    def _interrupt(self, when: float) -> None:
        """Barge-in: every queued segment is dropped and its Triton requests cancelled."""
        for segment in self.segments:
            self._finish(segment, interrupted=True, at=when)
            segment.cancel()
            self._count_triton(segment)
        self.segments.clear()
        self.queued_seconds = self.behind_seconds = 0.0
        self._interrupted_at = when
        self.fade_step = max(self.fade_step, INTERRUPT_FADE_STEP)

    def _generate(self) -> None:
        """Move generation on: the playing segment up to `ahead_seconds` past its playback,
        the next one with what is left of that budget. A segment Triton fails is dropped
        (its listeners hear why); the session goes on."""
        budget = round(self.options.ahead_seconds * self.fps)
        for segment in list(self.segments)[:2]:
            try:
                segment.step(until=segment.played + budget)
            except TritonClientError as error:
                self._fail(segment, error)
                return
            if segment.frames is None:
                return  # still arriving: nothing is queued behind it
            budget -= segment.frames - segment.played
            if budget <= 0:
                return

    def _fail(self, segment: Segment, error: Exception) -> None:
        from frontend.errors import status_of  # (the error table imports this package's errors)

        metrics.triton_error(error)
        log.warning("session %s: segment %d failed: %s", self.id, segment.number, error)
        status, message = status_of(error)
        self._emit({"type": "error", "segment": segment.number, "error": message, "status": status},
                   time.monotonic())
        self.segments.remove(segment)
        self._finish(segment, interrupted=True, at=time.monotonic())
        segment.cancel()
        self._count_triton(segment)

    # -- ticks out ------------------------------------------------------------------------
    def _produce(self) -> None:
        tick = self._next_tick()
        due = self.clock.due(tick.n)
        self.counts[tick.kind] += 1
        metrics.SESSION_FRAMES.labels(tick.kind).inc()
        viewers = self.viewers
        if viewers or self.segments or self._listeners:
            self.last_activity = time.monotonic()
        if viewers:
            self._encode(tick, due, {viewer.codec for viewer in viewers})
        else:
            for out in self.outs.values():
                out.keyframe_wanted = True  # whoever comes next starts with a keyframe
        if self._interrupted_at is not None and tick.kind != "speech":
            self.interrupt_latency.add(due - self._interrupted_at)
            self._interrupted_at = None
        self._progress(due)
        self.tick += 1

    def _next_tick(self) -> Tick:
        n = self.tick
        start, stop = span(n, self.fps)
        audio = np.zeros(stop - start, np.float32)
        carry, self.carry = self.carry[: len(audio)], self.carry[len(audio) :]
        audio[: len(carry)] += carry
        segment = self.segments[0] if self.segments else None
        if segment is not None and segment.ended and segment.frames == 0:  # under one frame of audio
            self._drop_finished(segment)
            segment = self.segments[0] if self.segments else None
        if segment is None or (segment.played == 0 and self.position < segment.start):
            return self._idle_tick(n, audio)
        k = segment.played
        if not (segment.ready_to_start() if k == 0 else segment.ready(k)):
            self.behind_seconds += 1 / self.fps if k else 0.0
            self.state = "speaking" if k else self.state
            shown = self.shown or Tick(n, self.position, "idle", audio)
            return self._shown(Tick(n, shown.position, "hold", audio, shown.face, shown.strength))
        strength = segment.alpha(k)
        face = segment.face(k) if strength > 0 else None
        speech = segment.audio_of(k)
        audio[: len(speech)] += speech
        tick = self._shown(Tick(n, self.position, "speech", audio, face, strength))
        if k == 0:
            self.speech_start.add(self.clock.due(n) - segment.first_audio_at)
            metrics.SESSION_SPEECH_START.observe(self.clock.due(n) - segment.first_audio_at)
            if segment.first_frame_at is not None:
                self.first_frame_seconds.append(segment.first_frame_at - segment.first_audio_at)
            self._emit({"type": "speech_started", "segment": segment.number}, self.clock.due(n))
        segment.played += 1
        self.position += 1
        self.alpha, self.last_face = strength, face if face is not None else self.last_face
        self.state = "speaking"
        self.queued_seconds = sum(s.queued_seconds for s in self.segments)
        if segment.ended and segment.played == segment.frames:
            self._drop_finished(segment)
        return tick

    def _idle_tick(self, n: int, audio: np.ndarray) -> Tick:
        self.state, self.behind_seconds = "idle", 0.0
        position = self.position
        self.position += 1
        if self.alpha > 0 and self.last_face is not None:  # fading out after speech
            self.alpha = max(0.0, self.alpha - self.fade_step)
            if self.alpha > 0:
                return self._shown(Tick(n, position, "transition", audio, self.last_face, self.alpha))
        self.alpha, self.last_face = 0.0, None
        self.fade_step = 1.0 / max(1, self.options.transition_frames)
        return self._shown(Tick(n, position, "idle", audio))

    def _shown(self, tick: Tick) -> Tick:
        self.shown = tick
        return tick

    def _drop_finished(self, segment: Segment) -> None:
        self.segments.popleft()
        self.carry = np.concatenate([self.carry, segment.remainder()])
        self._finish(segment, interrupted=False, at=self.clock.due(self.tick + 1))
        self._count_triton(segment)
        self.queued_seconds = sum(s.queued_seconds for s in self.segments)

    def _finish(self, segment: Segment, interrupted: bool, at: float) -> None:
        if interrupted:
            self.segments_interrupted += 1
        else:
            self.segments_played += 1
        self._emit({"type": "speech_finished", "segment": segment.number,
                    "played_seconds": round(segment.played / self.fps, 3), "interrupted": interrupted}, at)

    def _count_triton(self, segment: Segment) -> None:
        flight = segment.utterance.flight
        self.triton["requests"] += flight.requests
        self.triton["cancelled"] += flight.cancelled
        self.triton["silent_frames"] += segment.utterance.skipped
        self.triton["faces"] += segment.faces_received

    def _encode(self, tick: Tick, due: float, codecs: set[str]) -> None:
        """The tick's packets, once per codec watched, queued for their time."""
        picture = self._picture(tick)
        packets = {}
        for codec in codecs:
            if codec not in self.outs:
                self.outs[codec] = VideoOut(codec, self.avatar, self.options, self.idle_cycles)
            packets[codec] = self.outs[codec].frame(tick, picture)
        self.outgoing.append((due, ("video", tick.n, packets)))
        for pts, data in self.opus.add(tick.audio, span(tick.n, self.fps)[0]):
            self.outgoing.append((self.clock.due_sample(pts), ("audio", pts, data)))
        self.frames_sent += 1

    def _publish(self, now: float) -> None:
        """Hand every packet that is due to the viewers: video frame n and the audio of frame n
        leave at the same moment, so the sender reports of both tracks tell the same clock."""
        due = []
        while self.outgoing and self.outgoing[0][0] <= now + 0.001:
            due.append(self.outgoing.popleft()[1])
        for viewer in self.viewers:
            viewer.publish(due)

    def _picture(self, tick: Tick) -> Callable[[], np.ndarray]:
        """The tick's frame, composed only if some codec needs it (not for replayed idle packets)."""
        made: list[np.ndarray] = []

        def picture() -> np.ndarray:
            if not made:
                if tick.kind == "hold" and self.last_picture and self.last_picture[0] == tick.n - 1:
                    made.append(self.last_picture[1])  # the same frame again
                else:
                    made.append(self.composer.frame(tick.position, tick.face, tick.strength))
                self.last_picture = (tick.n, made[0])
            return made[0]

        return picture

    # -- events ---------------------------------------------------------------------------
    def _emit(self, event: dict, at: float) -> None:
        with self._lock:
            listeners = list(self._listeners)
        for notify in listeners:
            notify(event, at)

    def _progress(self, due: float) -> None:
        if not self.segments or due - self._last_progress < PROGRESS_EVERY_S:
            return
        self._last_progress = due
        head = self.segments[0]
        self._emit({"type": "progress", "segment": head.number, "played_seconds": round(head.played / self.fps, 3),
                    "queued_seconds": round(self.queued_seconds, 3),
                    "behind_seconds": round(self.behind_seconds, 3)}, due)
