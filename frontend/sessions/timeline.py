"""What a conversational session shows and plays at each tick: a plain, synchronous timeline.

Tick n is video frame n and the 48 kHz samples span(n) of the session's clock,
[round(n x 48000 / fps), round((n + 1) x 48000 / fps)). A tick is one of:

    idle        the avatar's own frame at the current cycle position, silence
    speech      frame k of the playing segment: the avatar's frame with the generated
                face blended in (at its alpha, segments.py), and the segment's audio
    transition  after speech ends or is interrupted: the last face fading out, silence
    hold        speech whose next frame is not ready yet: the last picture again and
                silence; speech video and its audio wait together, never apart

Audio is counted in samples of the session's clock, never rounded per frame: a speech
tick plays the next len(span(n)) samples of its segment, so at every fps (48000 / fps
need not be whole) exactly one sample leaves per sample of the clock, for hours. The
face of segment frame k is shown on the tick that plays its audio; the two differ in
length by at most one sample, which never accumulates.

The avatar's cycle position advances with every tick but holds. A segment starts at a
position chosen when its audio begins (the current one plus how long frame 0 is expected
to take, from earlier segments), and its frame k uses the latents of position start + k:
speech begins where the idle cycle is (no jump), and a segment queued behind another
continues it without a gap.

Nothing here waits, sends or calls Triton: the session's thread (session.py) feeds the
segments, calls `next()` when a tick is due, and hands the tick to media out (media.py).
Events come back with the tick or the interrupt that caused them: a segment's
speech_started always comes before its speech_finished, and a segment cut before its
first frame gets only speech_finished, with played_seconds 0.
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from frontend.sessions.segments import Segment, span

INTERRUPT_FADE_STEP = 0.5  # an interrupted face fades out in at most two frames: barge-in is seen at once
KINDS = ("idle", "speech", "transition", "hold")


@dataclass
class Event:
    """speech_started or speech_finished of `segment`, due when tick `n` is (or at once: n None)."""

    type: str
    segment: Segment
    n: int | None
    played_seconds: float = 0.0
    interrupted: bool = False

    def message(self) -> dict:
        if self.type == "speech_started":
            return {"type": self.type, "segment": self.segment.number}
        return {"type": self.type, "segment": self.segment.number, "played_seconds": self.played_seconds,
                "interrupted": self.interrupted}


@dataclass
class Tick:
    n: int
    position: int  # the avatar's cycle position shown
    kind: str  # idle, speech, transition, hold
    audio: np.ndarray  # 48 kHz samples of this tick: exactly span(n)
    face: np.ndarray | None = None
    strength: float = 0.0
    events: list[Event] = field(default_factory=list)


class Timeline:
    def __init__(self, fps: int, transition_frames: int = 3, start_lead_seconds: float = 0.3):
        self.fps = fps
        self.n = 0  # the next tick
        self.position = 0  # the avatar's cycle position of the next tick
        self.segments: deque[Segment] = deque()  # the head plays (or waits for its start)
        self.count = 0  # segments opened
        self.transition_frames = transition_frames
        self.alpha, self.last_face = 0.0, None  # the face strength and face of the last tick (for fades)
        self.fade_step = self._calm_fade()
        self.shown: Tick | None = None  # the last tick (a hold shows it again)
        self.carry = np.zeros(0, np.float32)  # a finished segment's audio after its last frame
        # How long recent segments' frame 0 took to be ready (seconds): a new segment starts that
        # far ahead in the cycle (the quickest of them: arriving later means a brief hold, never a jump).
        self.first_frame_seconds: deque[float] = deque([start_lead_seconds], maxlen=8)
        self.state = "idle"
        self.counts = dict.fromkeys(KINDS, 0)
        self.behind_seconds = 0.0  # how long the playing segment has waited for its frames
        self.stalled = 0  # holds of a segment that had started playing: speech frozen mid-way
        self.played = self.interrupted = 0  # segments

    # -- segments in ----------------------------------------------------------------------
    @property
    def open_segment(self) -> Segment | None:
        """The segment still receiving audio (not ended), if any: always the last."""
        return self.segments[-1] if self.segments and not self.segments[-1].ended else None

    def placement(self) -> tuple[int, int, float]:
        """(number, cycle start position, alpha before it) of the next segment."""
        if self.segments:  # contiguous: it starts where the last queued segment ends
            last = self.segments[-1]
            start, alpha = last.start + last.frames, last.alpha(last.frames - 1) if last.frames else 0.0
        else:  # after idle: where the cycle will be when its frame 0 is expected (if later, it holds)
            start, alpha = self.position + math.floor(min(self.first_frame_seconds) * self.fps), 0.0
        return self.count + 1, start, alpha or 0.0

    def append(self, segment: Segment) -> None:
        """A new segment, made with `placement()`'s figures, behind the queued ones."""
        assert self.open_segment is None, "the open segment ends before another opens"
        self.count = segment.number
        self.segments.append(segment)

    def interrupt(self) -> tuple[list[Segment], list[Event]]:
        """Barge-in: every queued segment is dropped (returned, to cancel its Triton requests), each
        with its speech_finished; the face fades out at once, and the sound stops."""
        dropped, events = list(self.segments), [self._finished(s, None, interrupted=True) for s in self.segments]
        self.segments.clear()
        self.carry = np.zeros(0, np.float32)
        self.behind_seconds = 0.0
        self.fade_step = max(self.fade_step, INTERRUPT_FADE_STEP)
        return dropped, events

    def drop(self, segment: Segment) -> Event:
        """A segment that failed (Triton): gone from the queue, finished as interrupted."""
        self.segments.remove(segment)
        return self._finished(segment, None, interrupted=True)

    def playable(self) -> bool:
        """Whether the next tick plays a speech frame now (neither idle nor a hold), or finishes a
        segment of no whole frame: what an unpaced session waits for."""
        segment = self.segments[0] if self.segments else None
        if segment is None or (segment.played == 0 and self.position < segment.start):
            return False
        if segment.ended and segment.frames == 0:
            return True
        return segment.ready_to_start() if segment.played == 0 else segment.ready(segment.played)

    @property
    def queued_seconds(self) -> float:
        """Speech received and not yet played."""
        return sum(s.queued_seconds for s in self.segments)

    # -- ticks out ------------------------------------------------------------------------
    def next(self) -> Tick:
        n = self.n
        self.n += 1
        events = []
        segment = self._head(n, events)
        start, stop = span(n, self.fps)
        audio = np.zeros(stop - start, np.float32)
        carry, self.carry = self.carry[: len(audio)], self.carry[len(audio) :]
        audio[: len(carry)] += carry
        if segment is None or (segment.played == 0 and self.position < segment.start):
            tick = self._idle(n, audio)
        elif not (segment.ready_to_start() if segment.played == 0 else segment.ready(segment.played)):
            tick = self._hold(n, audio, segment)
        else:
            tick = self._speech(n, audio, segment, events)
        tick.events = events
        self.counts[tick.kind] += 1
        self.shown = tick
        return tick

    def _head(self, n: int, events: list[Event]) -> Segment | None:
        """The segment that plays next; an ended one of no whole frame is finished unplayed."""
        while self.segments and self.segments[0].ended and self.segments[0].frames == 0:
            events.append(self._finish_head(n))
        return self.segments[0] if self.segments else None

    def _idle(self, n: int, audio: np.ndarray) -> Tick:
        self.state, self.behind_seconds = "idle", 0.0
        position = self.position
        self.position += 1
        if self.alpha > 0 and self.last_face is not None:  # fading out after speech
            self.alpha = max(0.0, self.alpha - self.fade_step)
            if self.alpha > 0:
                return Tick(n, position, "transition", audio, self.last_face, self.alpha)
        self.alpha, self.last_face = 0.0, None
        self.fade_step = self._calm_fade()
        return Tick(n, position, "idle", audio)

    def _hold(self, n: int, audio: np.ndarray, segment: Segment) -> Tick:
        if segment.played:  # a segment that has started waits for its next frame: it is behind
            self.behind_seconds += 1 / self.fps
            self.stalled += 1
            self.state = "speaking"
        shown = self.shown or Tick(n, self.position, "idle", audio)
        return Tick(n, shown.position, "hold", audio, shown.face, shown.strength)

    def _speech(self, n: int, audio: np.ndarray, segment: Segment, events: list[Event]) -> Tick:
        k = segment.played
        strength = segment.alpha(k)
        face = segment.face(k) if strength > 0 else None
        speech = segment.take_audio(len(audio))
        audio[: len(speech)] += speech
        if k == 0:
            if segment.first_frame_at is not None and segment.first_audio_at is not None:
                self.first_frame_seconds.append(segment.first_frame_at - segment.first_audio_at)
            events.append(Event("speech_started", segment, n))
        tick = Tick(n, self.position, "speech", audio, face, strength)
        segment.played += 1
        self.position += 1
        self.alpha, self.last_face = strength, face if face is not None else self.last_face
        self.state = "speaking"
        if segment.ended and segment.played == segment.frames:
            events.append(self._finish_head(n + 1))
        return tick

    def _finish_head(self, n: int) -> Event:
        """The head segment has played all of it: its audio after the last whole frame plays on."""
        segment = self.segments.popleft()
        self.carry = np.concatenate([self.carry, segment.take_audio(None)])
        return self._finished(segment, n, interrupted=False)

    def _finished(self, segment: Segment, n: int | None, interrupted: bool) -> Event:
        if interrupted:
            self.interrupted += 1
        else:
            self.played += 1
        return Event("speech_finished", segment, n, round(segment.played / self.fps, 3), interrupted)

    def _calm_fade(self) -> float:
        return 1.0 / max(1, self.transition_frames)
