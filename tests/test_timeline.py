"""The session's timeline (frontend/sessions/timeline.py) on its own: what every tick shows and
plays, tick by tick, without a clock, a thread, Triton or a network.

Segments are the real ones (real PCM, resampled, with their silence test); only the faces
Triton would send back are put in by hand (a face's pixels do not matter to the timeline),
which is also how a test holds a frame back to make the timeline wait for it."""
from __future__ import annotations

import numpy as np
import pytest

from frontend.sessions.segments import Segment, span
from frontend.sessions.session import SessionOptions
from frontend.sessions.timeline import INTERRUPT_FADE_STEP, Timeline
from frontend.video.rtc import AUDIO_RATE

RATE = 16000


def tone(seconds: float, rate: int = RATE, start: int = 0) -> np.ndarray:
    """A voiced signal (a 220 Hz tone at -12 dBFS), as float samples."""
    t = (np.arange(round(seconds * rate)) + start) / rate
    return (0.25 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)


def pcm(samples: np.ndarray) -> bytes:
    return (np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes()


def open_segment(timeline: Timeline, samples: np.ndarray, rate: int = RATE, silence_dbfs: float | None = -50.0,
                 end: bool = True, faces: bool = True) -> tuple[Segment, np.ndarray]:
    """A segment of `samples` behind the queued ones, its audio as it will play at 48 kHz,
    and (with `faces`) a face for every frame that needs one."""
    options = SessionOptions(fps=timeline.fps, transition_frames=timeline.transition_frames,
                             silence_dbfs=silence_dbfs)
    number, start, alpha = timeline.placement()
    segment = Segment(number, None, None, timeline.fps, rate, start, options, alpha)
    timeline.append(segment)
    segment.add(pcm(samples), when=0.0)
    if end:
        segment.end()
        if faces:
            give_faces(segment, range(segment.frames))
    return segment, segment.audio.copy()


def give_faces(segment: Segment, frames) -> None:
    """What Triton would answer: one face per frame (the timeline passes it through)."""
    for k in frames:
        if segment.alpha(k):
            segment.faces[k] = np.full((4, 4, 3), k % 256, np.uint8)


def run(timeline: Timeline, ticks: int) -> list:
    return [timeline.next() for _ in range(ticks)]


def played_audio(ticks) -> np.ndarray:
    return np.concatenate([t.audio for t in ticks])


def events(ticks) -> list[tuple[int, str, int]]:
    return [(e.n, e.type, e.segment.number) for t in ticks for e in t.events]


@pytest.mark.parametrize("fps", range(1, 61))
def test_every_fps_plays_a_segment_sample_exact_and_returns_to_idle(fps):
    """At every frame rate the API takes (48000 / fps is whole for few of them), every sample of
    the segment leaves once, in order, right where its first frame starts; each tick's audio
    is exactly its span of the clock; the face of frame k is on the k-th speech tick."""
    timeline = Timeline(fps, transition_frames=3, start_lead_seconds=0.0)
    run(timeline, 3)
    segment, expected = open_segment(timeline, tone(2.3))
    ticks = run(timeline, segment.frames + 2 * fps + 5)
    for tick in ticks:
        start, stop = span(tick.n, fps)
        assert len(tick.audio) == stop - start
    speech = [t for t in ticks if t.kind == "speech"]
    assert len(speech) == segment.frames == int(2.3 * fps)
    first = speech[0].n
    out = played_audio(ticks)
    offset = span(first, fps)[0] - span(ticks[0].n, fps)[0]
    assert np.array_equal(out[offset : offset + len(expected)], expected)
    assert not out[:offset].any() and not out[offset + len(expected):].any()
    assert [int(t.face[0, 0, 0]) for t in speech if t.face is not None] == \
        [k % 256 for k in range(segment.frames) if segment.alpha(k)]
    assert events(ticks) == [(first, "speech_started", 1), (speech[-1].n + 1, "speech_finished", 1)]
    assert ticks[-1].kind == "idle" and timeline.state == "idle" and not timeline.segments


def test_an_hour_of_ticks_loses_no_sample():
    """An hour at 29 fps (48000 / 29 is not whole) with a segment every minute: the ticks' audio
    is exactly 3600 x 48000 samples, and every segment's audio is in it, whole."""
    fps = 29
    timeline = Timeline(fps, start_lead_seconds=0.0)
    ticks_played, found, total = 0, 0, 0
    for minute in range(60):
        segment, expected = open_segment(timeline, tone(1.5, start=minute))
        ticks = run(timeline, 60 * fps)
        ticks_played += len(ticks)
        out = played_audio(ticks)
        total += len(out)
        first = next(t.n for t in ticks if t.kind == "speech")
        offset = span(first, fps)[0] - span(ticks[0].n, fps)[0]
        found += np.array_equal(out[offset : offset + len(expected)], expected)
    assert ticks_played == 3600 * fps and total == 3600 * AUDIO_RATE
    assert found == 60


def test_fades_in_and_out_over_the_transition_frames():
    timeline = Timeline(25, transition_frames=4, start_lead_seconds=0.0)
    segment, _ = open_segment(timeline, tone(1.0))
    ticks = run(timeline, 40)
    kinds = [t.kind for t in ticks]
    assert kinds[:25] == ["speech"] * 25 and kinds[25:28] == ["transition"] * 3 and kinds[28] == "idle"
    assert [t.strength for t in ticks[:4]] == pytest.approx([0.25, 0.5, 0.75, 1.0])  # in
    assert [t.strength for t in ticks[25:28]] == pytest.approx([0.75, 0.5, 0.25])  # out, the last face
    assert all(t.face is not None for t in ticks[25:28])
    assert not any(t.audio.any() for t in ticks[26:])  # silence after the segment's last samples


def test_a_frame_not_ready_holds_picture_and_sound_together_and_loses_nothing():
    """Frame 5's face is late: the timeline shows the last picture again with silence (hold) until
    it comes, then goes on with frame 5 and its audio: no sample of speech is skipped."""
    timeline = Timeline(25, start_lead_seconds=0.0)
    segment, expected = open_segment(timeline, tone(1.0), faces=False)
    give_faces(segment, [k for k in range(segment.frames) if k != 5])
    first = run(timeline, 5 + 4)
    assert [t.kind for t in first] == ["speech"] * 5 + ["hold"] * 4
    assert all(not t.audio.any() for t in first[5:]) and all(t.face is first[4].face for t in first[5:])
    assert timeline.behind_seconds == pytest.approx(4 / 25)
    give_faces(segment, [5])
    rest = run(timeline, 30)
    speech = [t for t in first + rest if t.kind == "speech"]
    assert len(speech) == 25
    assert np.array_equal(np.concatenate([t.audio for t in speech])[: len(expected) - 100],
                          expected[: len(expected) - 100])


def test_a_segment_waits_for_its_first_face_before_it_starts():
    timeline = Timeline(25, start_lead_seconds=0.0)
    segment, _ = open_segment(timeline, tone(1.0), faces=False)
    waiting = run(timeline, 6)
    assert {t.kind for t in waiting} == {"hold"} and not any(t.events for t in waiting)
    assert timeline.behind_seconds == 0  # not started: not behind
    give_faces(segment, range(segment.frames))
    assert timeline.next().kind == "speech"


def test_an_interrupt_fades_out_at_once_and_finishes_every_queued_segment():
    timeline = Timeline(25, transition_frames=3, start_lead_seconds=0.0)
    first, _ = open_segment(timeline, tone(2.0))
    second, _ = open_segment(timeline, tone(1.0))
    played = run(timeline, 10)
    dropped, finished = timeline.interrupt()
    assert dropped == [first, second]
    assert [(e.type, e.segment.number, e.played_seconds, e.interrupted, e.n) for e in finished] == \
        [("speech_finished", 1, 0.4, True, None), ("speech_finished", 2, 0.0, True, None)]
    after = run(timeline, 4)
    assert [t.kind for t in after] == ["transition", "idle", "idle", "idle"]
    assert after[0].strength == pytest.approx(1 - INTERRUPT_FADE_STEP)
    assert not any(t.audio.any() for t in after)
    assert events(played) == [(0, "speech_started", 1)]
    assert timeline.interrupted == 2 and timeline.played == 0


def test_a_segment_cut_before_its_first_frame_gets_only_its_end():
    timeline = Timeline(25, start_lead_seconds=0.0)
    open_segment(timeline, tone(1.0), faces=False)
    ticks = run(timeline, 3)
    _, finished = timeline.interrupt()
    assert not events(ticks)
    assert [(e.type, e.played_seconds, e.interrupted) for e in finished] == [("speech_finished", 0.0, True)]


def test_silent_frames_need_no_face_and_show_the_avatar():
    """A pause in the middle: frames whose window hears only silence fade to the avatar's own face
    and need nothing from Triton; the pause's audio still plays."""
    timeline = Timeline(25, transition_frames=2, start_lead_seconds=0.0)
    samples = np.concatenate([tone(0.6), np.zeros(RATE), tone(0.6)])
    segment, expected = open_segment(timeline, samples)
    needing = [k for k in range(segment.frames) if segment.alpha(k)]
    assert len(needing) < segment.frames - 15  # most of the second of silence needs no face
    ticks = run(timeline, segment.frames)
    assert all(t.kind == "speech" for t in ticks)
    assert [t.strength == 0 for t in ticks].count(True) == segment.frames - len(needing)
    assert all(t.face is None for t in ticks if t.strength == 0)


def test_under_one_frame_of_speech_finishes_unplayed_and_its_sound_still_plays():
    timeline = Timeline(25, start_lead_seconds=0.0)
    segment, expected = open_segment(timeline, tone(0.02))
    assert segment.frames == 0
    tick = timeline.next()
    assert [(e.type, e.played_seconds, e.interrupted) for e in tick.events] == [("speech_finished", 0.0, False)]
    assert tick.kind == "idle" and np.array_equal(tick.audio[: len(expected)], expected)


def test_a_segment_queued_behind_another_continues_the_cycle_and_the_sound():
    timeline = Timeline(25, start_lead_seconds=0.0)
    first, audio1 = open_segment(timeline, tone(1.0))
    second, audio2 = open_segment(timeline, tone(0.5, start=RATE))
    assert second.start == first.start + first.frames
    ticks = run(timeline, first.frames + second.frames + 1)
    speech = [t for t in ticks if t.kind == "speech"]
    assert [t.position for t in speech] == list(range(first.start, first.start + first.frames + second.frames))
    assert events(ticks) == [(0, "speech_started", 1), (25, "speech_finished", 1), (25, "speech_started", 2),
                             (37, "speech_finished", 2)]
    out = played_audio(ticks)
    assert np.array_equal(out[: len(audio1)], audio1)  # the first, whole; the second right behind it
    assert np.allclose(out[len(audio1) : len(audio1) + len(audio2) - 2000], audio2[: len(audio2) - 2000], atol=1e-6)


def test_a_segment_still_arriving_plays_what_is_there_and_ends_where_its_audio_ends():
    """The speech socket closed without segment_end: the session ends the open segment, which
    plays to where its audio stops and returns to idle."""
    timeline = Timeline(25, start_lead_seconds=0.0)
    segment, _ = open_segment(timeline, tone(0.8), end=False)
    assert timeline.open_segment is segment and segment.frames is None
    segment.end()
    give_faces(segment, range(segment.frames))
    ticks = run(timeline, segment.frames + 10)
    assert [t.kind for t in ticks].count("speech") == segment.frames == 20
    assert timeline.open_segment is None and timeline.state == "idle"
