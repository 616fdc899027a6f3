"""A session's media out: each tick's picture and sound as packets, handed to the viewers when due.

Frame n and the audio of frame n carry the same clock time (n / fps, and sample
n x 48000 / fps) and leave at that time, so a player's lip sync holds over hours:
nothing is estimated, every timestamp is counted. Video is encoded once per codec
watched, for every viewer of it (frontend/sessions/viewers.py): idle ticks replay the
avatar's idle cycle, encoded once per avatar (idle.py); anything else is encoded live,
a keyframe first whenever the replay is left or a viewer asks for one.

Viewers' keyframe requests come from the event loop's thread; everything else runs on
the session's thread.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable

import numpy as np

from frontend import metrics
from frontend.avatars.store import Avatar
from frontend.generation.core import Composer
from frontend.sessions.idle import IdleCycles
from frontend.sessions.segments import span
from frontend.sessions.timeline import Tick
from frontend.video.rtc import EncodedFrame, OpusEncoder, VideoEncoder

PICTURE_LOSS_INTERVAL_S = 1.0  # at most one keyframe a second for viewers' picture-loss reports


class VideoOut:
    """One codec's video for every viewer that uses it: the idle cycle's packets replayed, or
    frames encoded live (a keyframe first whenever the replay is left, or a viewer asks)."""

    def __init__(self, codec: str, avatar: Avatar, fps: int, video_kbps: int, keyframe_seconds: float,
                 idle_cycles: IdleCycles):
        width, height = avatar.size
        self.codec, self.avatar, self.fps, self.idle_cycles = codec, avatar, fps, idle_cycles
        self.encoder = VideoEncoder(codec, width, height, fps, video_kbps,
                                    keyframe_interval=max(1, round(keyframe_seconds * fps)))
        self.replaying = False
        self.last_loss_keyframe = 0.0  # when a keyframe last answered a picture loss (time.monotonic)

    def frame(self, tick: Tick, picture: Callable[[], np.ndarray], keyframe_wanted: bool) -> EncodedFrame:
        if tick.kind == "idle" and not keyframe_wanted:
            cycle = self.idle_cycles.get(self.avatar, self.codec, self.fps)
            if cycle is not None:
                packet = cycle.at(tick.position)
                if self.replaying or packet.keyframe:  # the replay starts at one of its keyframes
                    self.replaying = True
                    return packet
        keyframe = keyframe_wanted or self.replaying  # the decoder holds the replay's pictures
        self.replaying = False
        return self.encoder.encode(picture(), keyframe)

    def close(self) -> None:
        self.encoder.close()


class MediaOut:
    def __init__(self, avatar: Avatar, fps: int, video_kbps: int, keyframe_seconds: float,
                 idle_cycles: IdleCycles, composer: Composer):
        self.avatar, self.fps, self.video_kbps, self.keyframe_seconds = avatar, fps, video_kbps, keyframe_seconds
        self.idle_cycles, self.composer = idle_cycles, composer
        self.opus = OpusEncoder()
        self.outs: dict[str, VideoOut] = {}
        # Packets produced, waiting for their time: (due, ("video", frame n, {codec: packet}) or
        # ("audio", sample, packet)), in the order they are due.
        self.outgoing: deque[tuple[float, tuple]] = deque()
        self.last_picture: tuple[int, np.ndarray] | None = None  # (tick, its composed frame)
        self.frames_sent = 0
        self._keyframes: set[str] = set()  # codecs whose next frame is a keyframe
        self._lock = threading.Lock()

    # -- from any thread --------------------------------------------------------------------
    def want_keyframe(self, codec: str | None = None) -> None:
        """The next frame of `codec` (of every codec: None) is a keyframe: a viewer joined."""
        with self._lock:
            self._keyframes |= set(self.outs) if codec is None else {codec}

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
            out.last_loss_keyframe, result = now, "keyframe"
            self.want_keyframe(codec)
        metrics.SESSION_PICTURE_LOSS.labels(result).inc()

    def replaying(self) -> dict[str, bool]:
        return {codec: out.replaying for codec, out in dict(self.outs).items()}

    # -- on the session's thread --------------------------------------------------------------
    def encode(self, tick: Tick, due: float, due_sample: Callable[[int], float], codecs: set[str],
               picture: Callable[[], np.ndarray] | None = None) -> None:
        """The tick's packets, once per codec watched, queued for their time (`picture`: the tick's
        frame, made once whoever asks first: picture(tick))."""
        picture = picture or self.picture(tick)
        packets = {}
        for codec in codecs:
            if codec not in self.outs:
                self.outs[codec] = VideoOut(codec, self.avatar, self.fps, self.video_kbps, self.keyframe_seconds,
                                            self.idle_cycles)
                self.want_keyframe(codec)
            packets[codec] = self.outs[codec].frame(tick, picture, self._take_keyframe(codec))
        self.outgoing.append((due, ("video", tick.n, packets)))
        for pts, data in self.opus.add(tick.audio, span(tick.n, self.fps)[0]):
            self.outgoing.append((due_sample(pts), ("audio", pts, data)))
        self.frames_sent += 1

    def unwatched(self) -> None:
        """No viewer now: whoever comes next starts with a keyframe."""
        self.want_keyframe()

    @property
    def next_due(self) -> float | None:
        return self.outgoing[0][0] if self.outgoing else None

    def due(self, now: float) -> list[tuple]:
        """Every packet due by `now`: video frame n and the audio of frame n leave together, so the
        sender reports of both tracks tell the same clock."""
        due = []
        while self.outgoing and self.outgoing[0][0] <= now + 0.001:
            due.append(self.outgoing.popleft()[1])
        return due

    def close(self) -> None:
        self.opus.close()
        for out in self.outs.values():
            out.close()

    def _take_keyframe(self, codec: str) -> bool:
        with self._lock:
            wanted = codec in self._keyframes
            self._keyframes.discard(codec)
            return wanted

    def picture(self, tick: Tick) -> Callable[[], np.ndarray]:
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
