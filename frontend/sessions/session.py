"""A session: one avatar speaking what it is sent, on one clock; the one engine of every live path.

A conversational session's clock ticks at its fps from its creation to its end; each tick is
one video frame and its audio, for every viewer. What a tick shows and plays is
the timeline's (timeline.py: idle, speech, transition, hold; sample-exact audio);
turning it into packets for the WebRTC viewers is media out's (media.py), into a fragmented MP4
its outputs' (outputs.py). This module is the thread that drives them, and what other threads
may ask of it.

An unpaced session (`paced=False`: /ws/live) runs the same way without the clock: each speech
frame leaves as soon as it is made, nothing else is shown (no idle or held frames), and the
session ends once its one segment has played. The clock can be injected (`Clock(fps, now)`):
tests drive a session turn by turn (`turn(wait=False)`) without sleeping.

One thread per session runs everything but the network: reading its inbox
(speech, segment ends, interrupts), moving generation on (non-blocking), and
producing each tick LEAD_S before it is due. If it falls behind by more than
REBASE_S, the clock moves for both tracks together. `interrupt` cancels the
queued speech and its Triton requests (queued and in flight) at once.

Events reach listeners in order, each with the time it happens (a tick's due time,
or now): no event is ever earlier than one emitted before it.
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

from client.errors import TritonClientError
from frontend import memory, metrics
from frontend.avatars.store import Avatar
from frontend.errors import status_of
from frontend.exceptions import ClientGone, SegmentTooLong, SessionNotFound, TooManyPublications, TooManyViewers
from frontend.generation.core import Composer, Report
from frontend.live_first import LiveFirst
from frontend.sessions.idle import IdleCycles
from frontend.sessions.media import MediaOut
from frontend.sessions.segments import Segment
from frontend.sessions.timeline import Event, Tick, Timeline
from frontend.video.rtc import AUDIO_RATE

log = logging.getLogger(__name__)

LEAD_S = 0.02  # a tick is produced this long before it is due (its encoding fits in it)
REBASE_S = 0.25  # a tick later than this moves the clock, for both tracks: no burst of late frames
POLL_S = 0.005  # how often generation is looked at while Triton has work of the session's
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
    paced: bool = True  # False: frames leave as soon as they are made, speech only (/ws/live)


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
    """When tick n is due (on `now`'s time: time.monotonic by default), and where its audio lies on
    the 48 kHz timeline."""

    def __init__(self, fps: int, now: Callable[[], float] = time.monotonic):
        self.fps, self.now = fps, now
        self.t0 = now() + 0.05
        self.rebased = 0

    def due(self, n: int) -> float:
        return self.t0 + n / self.fps

    def due_sample(self, sample: int) -> float:
        return self.t0 + sample / AUDIO_RATE

    def rebase(self, n: int, now: float) -> None:
        """Make tick n due now: every later frame and sample moves with it."""
        self.t0, self.rebased = now - n / self.fps, self.rebased + 1


class Session:
    """`speak`, `segment_end`, `interrupt`, the viewer and listener methods and `close` may be
    called from any thread; everything else runs on the session's own thread."""

    def __init__(self, session_id: str, avatar: Avatar, client, options: SessionOptions, idle_cycles: IdleCycles,
                 ice_servers: list[dict] | None = None, max_viewers: int = 8, live_first: LiveFirst | None = None,
                 tenant: str | None = None, clock: Clock | None = None):
        self.id, self.avatar, self.client, self.options = session_id, avatar, client, options
        self.tenant = tenant  # its owner (frontend/access.py); None: the open service's
        self.live_first = live_first or LiveFirst(enabled=False)  # told when a segment is awaited and plays
        self.ice_servers = ice_servers or []  # its peers' (ours and its viewers'): static, and TURN minted for it
        self.max_viewers = max_viewers
        self.end_reason = "ended"
        self.fps = options.fps
        self.clock = clock or Clock(self.fps)
        self.timeline = Timeline(self.fps, options.transition_frames, options.start_lead_seconds)
        self.outputs: list = []  # besides the viewers: where speech frames go (outputs.Fmp4Out)
        self.finished_segment: Segment | None = None  # an unpaced session's segment, once it has played
        self.failure: BaseException | None = None  # what ended it, if something did
        self._inbox_audio = 0.0  # seconds of speech sent to it and not yet taken from its inbox
        self.composer = Composer(avatar, Report(frames=0, fps=self.fps, audio_seconds=0.0))
        self.media = MediaOut(avatar, self.fps, options.video_kbps, options.keyframe_seconds, idle_cycles,
                              self.composer)
        self.inbox: queue.Queue = queue.Queue()
        self._viewers: dict[str, object] = {}
        self._uncounted: set[str] = set()  # viewers that are a publication's (no viewer slot, no viewer metric)
        self._publications: dict[str, object] = {}  # frontend/sessions/publishing.py
        self._listeners: list[Callable[[dict, float], None]] = []
        self._last_event_at = 0.0  # events are never earlier than the one before
        self.speaker = None  # the speech socket connected now (one at a time)
        self._lock = threading.Lock()
        self._closing = False
        self.created = time.time()
        self.last_activity = time.monotonic()
        self.queued_seconds = 0.0  # speech received and not yet played (read by the speech route)
        self.triton = {"requests": 0, "cancelled": 0, "faces": 0, "silent_frames": 0}
        self.speech_start, self.interrupt_latency = Latency(), Latency()
        self._interrupted_at: float | None = None
        self._last_progress = 0.0
        self.error: str | None = None
        self.closed = threading.Event()
        self.thread = threading.Thread(target=self.run, name=f"session-{session_id}", daemon=True)

    # -- called from other threads --------------------------------------------------------
    def speak(self, pcm16: bytes, sample_rate: int) -> None:
        with self._lock:
            self._inbox_audio += len(pcm16) / 2 / sample_rate
        self.inbox.put((time.monotonic(), sample_rate, pcm16))

    @property
    def backlog_seconds(self) -> float:
        """Speech sent to it and not yet played (its inbox included): what its speech socket holds
        the sender back by (one rule for every live path)."""
        return self.queued_seconds + self._inbox_audio

    def add_output(self, output) -> None:
        """Speech frames (and their audio) go to `output` too (before the session starts)."""
        self.outputs.append(output)

    def segment_end(self) -> None:
        """The open segment has all its audio (a speech socket that closes says so too)."""
        self.inbox.put(END)

    def interrupt(self) -> None:
        self.inbox.put((INTERRUPT, time.monotonic()))

    def close(self, reason: str = "ended") -> None:
        """End the session: no viewer joins any more; its thread stops at its next look at the inbox.
        Its speech socket hears `reason` ("ended", "expired", "draining")."""
        with self._lock:
            self._closing = True
            self.end_reason = reason
        self.inbox.put(CLOSE)

    def going_away(self, seconds: float) -> None:
        """The replica is shutting down: the speech socket hears it, with the seconds left."""
        self._emit({"type": "going_away", "seconds_left": round(seconds, 1),
                    "reason": "this replica is shutting down: open a new session and move there"},
                   time.monotonic())

    def add_viewer(self, viewer_id: str, viewer, counted: bool = True) -> None:
        """Feed `viewer` from the next tick; SessionNotFound once the session is ending (a viewer
        that raced DELETE or expiry is refused, and its connection closed by the caller). A viewer
        not `counted` is a publication's: it takes no viewer slot."""
        with self._lock:
            if self._closing or self.closed.is_set():
                raise SessionNotFound(f"session {self.id!r} has ended")
            if counted and len(self._viewers) - len(self._uncounted) >= self.max_viewers:
                raise TooManyViewers(f"session {self.id!r} has its {self.max_viewers} viewers "
                                     "(MUSETALK_MAX_VIEWERS_PER_SESSION)")
            self._viewers[viewer_id] = viewer
            if not counted:
                self._uncounted.add(viewer_id)
        if counted:
            metrics.SESSION_VIEWERS.inc()
        self.media.want_keyframe(viewer.codec)

    def remove_viewer(self, viewer_id: str):
        """The viewer, no longer fed (None if it was not one of this session's)."""
        with self._lock:
            viewer = self._viewers.pop(viewer_id, None)
            counted = viewer_id not in self._uncounted
            self._uncounted.discard(viewer_id)
        if viewer is not None and counted:
            metrics.SESSION_VIEWERS.dec()
        return viewer

    @property
    def viewer_count(self) -> int:
        """Its WHEP viewers (a publication's peer is not one)."""
        with self._lock:
            return len(self._viewers) - len(self._uncounted)

    def add_publication(self, publication, most: int) -> None:
        """Send the session to `publication`'s destination too (frontend/sessions/publishing.py)."""
        with self._lock:
            if self._closing or self.closed.is_set():
                raise SessionNotFound(f"session {self.id!r} has ended")
            if len(self._publications) >= most:
                raise TooManyPublications(f"session {self.id!r} publishes to its {most} destinations "
                                          "(MUSETALK_MAX_PUBLICATIONS_PER_SESSION)")
            self._publications[publication.id] = publication

    def remove_publication(self, publication_id: str):
        """The publication, no longer fed (None if it was not one of this session's)."""
        with self._lock:
            return self._publications.pop(publication_id, None)

    @property
    def publications(self) -> list:
        with self._lock:
            return list(self._publications.values())

    def publish_state(self, status: dict) -> None:
        """A publication's state changed: its speech socket hears it."""
        self._emit({"type": "publish_state", **status}, time.monotonic())

    @property
    def viewers(self) -> list:
        with self._lock:
            return list(self._viewers.values())

    def viewer(self, viewer_id: str):
        with self._lock:
            return self._viewers.get(viewer_id)

    def picture_lost(self, codec: str) -> None:
        self.media.picture_lost(codec)

    def listen(self, notify: Callable[[dict, float], None]) -> None:
        """`notify(event, at)` gets every speech event, `at` being when (time.monotonic) it happens;
        `at` never decreases from one event to the next."""
        with self._lock:
            self._listeners.append(notify)

    def unlisten(self, notify: Callable[[dict, float], None]) -> None:
        with self._lock:
            if notify in self._listeners:
                self._listeners.remove(notify)

    def idle_for(self) -> float:
        """Seconds without a viewer, a listener or speech."""
        return time.monotonic() - self.last_activity

    @property
    def state(self) -> str:
        return self.timeline.state

    def status(self) -> dict:
        timeline = self.timeline
        return {
            "id": self.id, "avatar_id": self.avatar.name, "fps": self.fps, "state": timeline.state,
            "width": self.avatar.size[0], "height": self.avatar.size[1],
            "frames_sent": self.media.frames_sent, "viewers": self.viewer_count, "created": round(self.created, 3),
            "seconds": round(timeline.n / self.fps, 3), "clock_rebased": self.clock.rebased,
            "queued_seconds": round(self.queued_seconds, 3), "behind_seconds": round(timeline.behind_seconds, 3),
            "segments": {"played": timeline.played, "interrupted": timeline.interrupted,
                         "queued": len(timeline.segments)},
            "frames": dict(timeline.counts), "frames_stalled": timeline.stalled, "triton": self._triton_now(),
            "latency_ms": {"speech_start": self.speech_start.summary(),
                           "interrupt": self.interrupt_latency.summary()},
            "idle_cycle_replayed": self.media.replaying(),
            "publications": [publication.status() for publication in self.publications],
            "error": self.error,
        }

    # -- the session's thread -------------------------------------------------------------
    def start(self) -> Session:
        self.thread.start()
        return self

    def run(self) -> None:
        metrics.SESSION_THREADS.inc()
        try:
            while self.turn():
                pass
        except Exception as error:  # noqa: BLE001 - the session ends; its speech socket says why
            self.failure = error
            status, self.error = status_of(error)
            if status >= 500 and not isinstance(error, ClientGone):
                log.exception("session %s failed", self.id)
            metrics.triton_error(error)
            self._emit({"type": "error", "error": self.error, "status": status}, time.monotonic())
        finally:
            self._stop()

    def turn(self, wait: bool = True) -> bool:
        """One turn of the session's loop (False: it has ended). `wait=False` never blocks: a test
        that drives the clock calls it after each step of its own."""
        if not self.options.paced:
            return self._unpaced_turn(wait)
        produce = self.clock.due(self.timeline.n) - LEAD_S
        now = self.clock.now()
        if now >= produce:
            if now > produce + REBASE_S:
                self.clock.rebase(self.timeline.n, now)
            self._produce()
            return True
        next_due = self.media.next_due
        if next_due is not None and now >= next_due:
            self._publish(now)
            return True
        wake = min(produce, next_due) if next_due is not None else produce
        busy = any(s.utterance.busy for s in list(self.timeline.segments)[:2])
        timeout = (min(wake - now, POLL_S) if busy else wake - now) if wait else 0.0
        if self._read_inbox(timeout) is CLOSE:
            return False
        self._generate()
        return True

    def _unpaced_turn(self, wait: bool) -> bool:
        """Each speech frame as soon as it is ready; the outputs handed what is written whenever
        the next frame is not; the end once the segment has played."""
        if self.timeline.playable():
            self._produce()
            return True
        segments = list(self.timeline.segments)
        for output in self.outputs:
            output.flush(segments[0] if segments else self.finished_segment)
        if self.finished_segment is not None and not segments:
            for output in self.outputs:
                output.finish(self.finished_segment, self.timeline.carry)
            self.end_reason = "done"
            return False
        busy = any(s.utterance.busy for s in segments[:2])
        if self._read_inbox((POLL_S if busy else 0.25) if wait else 0.0) is CLOSE:
            return False
        self._generate()
        return True

    def _stop(self) -> None:
        with self._lock:
            self._closing = True
        dropped, events = self.timeline.interrupt()
        for segment in dropped:
            self._count_triton(segment)
            segment.cancel()
            self.live_first.arrived(segment)
        self._emit_events(events)
        self.composer.close()
        self.media.close()
        for output in self.outputs:
            output.close()
        for viewer in self.viewers:
            viewer.end()
        for publication in self.publications:
            publication.end()
        self._emit({"type": "session_ended", "id": self.id, "reason": self.end_reason}, time.monotonic())
        memory.release()
        self.closed.set()
        metrics.SESSION_THREADS.dec()

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
                if self.timeline.open_segment is not None:
                    self.timeline.open_segment.end()
                elif not self.options.paced and not self.timeline.segments and self.finished_segment is None:
                    self._speech(time.monotonic(), 16000, b"")  # an unpaced stream that ended with no speech
                    self.timeline.open_segment.end()
            elif item[0] is INTERRUPT:
                self._interrupt(item[1])
            else:
                with self._lock:
                    self._inbox_audio -= len(item[2]) / 2 / item[1]
                self._speech(*item)
            try:
                item = self.inbox.get_nowait()
            except queue.Empty:
                self.queued_seconds = self.timeline.queued_seconds
                return None

    def _speech(self, when: float, rate: int, pcm16: bytes) -> None:
        segment = self.timeline.open_segment
        if segment is not None and segment.sample_rate != rate:  # another socket, another rate: a new segment
            segment.end()
            segment = None
        if segment is None:
            number, start, alpha = self.timeline.placement()
            segment = Segment(number, self.avatar, self.client, self.fps, rate, start, self.options, alpha)
            self.timeline.append(segment)
            self.live_first.awaited(segment)  # someone waits to see it speak: offline work gives way
        try:
            segment.add(pcm16, when)
        except SegmentTooLong as error:  # it plays what it has; the speech socket closes
            self.failure = error
            segment.end()
            self._emit({"type": "error", "segment": segment.number, "error": str(error), "status": 413},
                       time.monotonic())

    def _interrupt(self, when: float) -> None:
        """Barge-in: every queued segment is dropped and its Triton requests cancelled."""
        dropped, events = self.timeline.interrupt()
        for segment in dropped:
            segment.cancel()
            self._count_triton(segment)
            self.live_first.arrived(segment)
        self._emit_events(events, now=when)
        self._interrupted_at = when

    def _generate(self) -> None:
        """Move generation on: the playing segment up to `ahead_seconds` past its playback,
        the next one with what is left of that budget. A segment Triton fails is dropped
        (its listeners hear why); the session goes on."""
        budget = round(self.options.ahead_seconds * self.fps)
        for segment in list(self.timeline.segments)[:2]:
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
        self.failure = error
        metrics.triton_error(error)
        log.warning("session %s: segment %d failed: %s", self.id, segment.number, error)
        status, message = status_of(error)
        now = time.monotonic()
        self._emit({"type": "error", "segment": segment.number, "error": message, "status": status}, now)
        self._emit_events([self.timeline.drop(segment)], now=now)
        segment.cancel()
        self._count_triton(segment)
        self.live_first.arrived(segment)

    # -- ticks out ------------------------------------------------------------------------
    def _produce(self) -> None:
        tick = self.timeline.next()
        due = self.clock.due(tick.n) if self.options.paced else time.monotonic()
        metrics.SESSION_FRAMES.labels(tick.kind).inc()
        viewers, publications = self.viewers, self.publications
        if viewers or publications or self.timeline.segments or self._listeners:
            self.last_activity = time.monotonic()
        picture = self.media.picture(tick)
        if viewers:
            self.media.encode(tick, due, self.clock.due_sample, {viewer.codec for viewer in viewers}, picture)
        else:
            self.media.unwatched()
        for publication in publications:  # idle and speech alike, as the viewers see them
            publication.frame(picture, tick.audio)
        if tick.kind == "speech":
            for output in self.outputs:
                output.write(picture(), tick.audio)
        for event in tick.events:
            if event.type == "speech_started" and event.segment.first_audio_at is not None:
                self.speech_start.add(due - event.segment.first_audio_at)
                metrics.SESSION_SPEECH_START.observe(due - event.segment.first_audio_at)
            if event.type in ("speech_started", "speech_finished"):
                self.live_first.arrived(event.segment)
            if event.type == "speech_finished":
                self._count_triton(event.segment)
                self.finished_segment = event.segment

        self._emit_events(tick.events)
        if self._interrupted_at is not None and tick.kind != "speech":
            self.interrupt_latency.add(due - self._interrupted_at)
            self._interrupted_at = None
        self.queued_seconds = self.timeline.queued_seconds
        self._progress(tick, due)

    def _publish(self, now: float) -> None:
        due = self.media.due(now)
        for viewer in self.viewers:
            viewer.publish(due)

    def _count_triton(self, segment: Segment, into: dict | None = None) -> dict:
        """Add a segment's Triton figures to the session's (when it ends), or to `into`."""
        counts = self.triton if into is None else into
        flight = segment.utterance.flight
        counts["requests"] += flight.requests
        counts["cancelled"] += flight.cancelled
        counts["silent_frames"] += segment.utterance.skipped
        counts["faces"] += segment.faces_received
        return counts

    def _triton_now(self) -> dict:
        """The ended segments' Triton figures with those of the queued ones so far, and the frames
        on their way to Triton now."""
        counts, segments = dict(self.triton), list(self.timeline.segments)
        for segment in segments:
            self._count_triton(segment, counts)
        in_flight = sum(s.utterance.flight.frames for s in segments)
        return {**counts, "in_flight": in_flight}  # (a copy of each deque: the session's thread changes them)

    # -- events ---------------------------------------------------------------------------
    def _emit_events(self, events: list[Event], now: float | None = None) -> None:
        for event in events:
            at = now if event.n is None or not self.options.paced else self.clock.due(event.n)
            self._emit(event.message(), at if at is not None else time.monotonic())

    def _emit(self, event: dict, at: float) -> None:
        with self._lock:
            listeners = list(self._listeners)
            at = self._last_event_at = max(at, self._last_event_at)
        for notify in listeners:
            notify(event, at)

    def _progress(self, tick: Tick, due: float) -> None:
        segments = self.timeline.segments
        if not segments or due - self._last_progress < PROGRESS_EVERY_S:
            return
        self._last_progress = due
        head = segments[0]
        self._emit({"type": "progress", "segment": head.number, "played_seconds": round(head.played / self.fps, 3),
                    "queued_seconds": round(self.queued_seconds, 3),
                    "behind_seconds": round(self.timeline.behind_seconds, 3)}, due)
