"""Avatars' idle cycles, encoded once and replayed by every session that shows them.

An idle session shows the avatar's own frames, the ping-pong cycle
(frames + frames reversed), over and over: the same pictures every cycle.
Encoding them for every session, every cycle, would make an idle session cost
as much as a speaking one. Instead each (avatar, codec, fps) cycle is encoded
once, in the background, as one stream with a keyframe every `gop` frames
(and at frame 0, so the replay loops: a cycle shorter than that is repeated up to
it), and sessions send those packets: a
session switches to the replay at a keyframe and leaves it for live encoding
(a keyframe first) whenever it shows anything else. Until a cycle is ready,
sessions encode their idle frames live.
"""
from __future__ import annotations

import logging
import math
import threading
import time
import weakref
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor

from frontend.avatars.store import Avatar
from frontend.video.rtc import EncodedFrame, VideoEncoder

log = logging.getLogger(__name__)


class EncodedCycle:
    def __init__(self, frames: list[EncodedFrame]):
        self.frames = frames
        self.nbytes = sum(len(f.data) for f in frames)

    def __len__(self) -> int:
        return len(self.frames)

    def at(self, position: int) -> EncodedFrame:
        """The packet of cycle position `position` (any position: the cycle repeats)."""
        return self.frames[position % len(self.frames)]


class IdleCycles:
    """Encoded idle cycles by (avatar, codec, fps), within a byte budget (least recently used go)."""

    def __init__(self, kbps: int, gop: int, budget_bytes: int = 256 << 20):
        self.kbps, self.gop, self.budget = kbps, gop, budget_bytes
        self._cycles: OrderedDict[tuple, EncodedCycle] = OrderedDict()
        self._building: set[tuple] = set()
        self._lock = threading.Lock()
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="idle-cycles")  # one at a time: CPU-heavy

    def get(self, avatar: Avatar, codec: str, fps: int) -> EncodedCycle | None:
        """The encoded cycle, or None while it is being encoded (its encoding starts now if needed)."""
        key = (id(avatar), codec, fps)
        with self._lock:
            cycle = self._cycles.get(key)
            if cycle is not None:
                self._cycles.move_to_end(key)
                return cycle
            if key not in self._building:
                self._building.add(key)
                # An avatar replaced or evicted from the store's cache takes its cycles with it.
                weakref.finalize(avatar, self._forget, id(avatar))
                self._worker.submit(self._build, key, avatar, codec, fps)
        return None

    def _build(self, key: tuple, avatar: Avatar, codec: str, fps: int) -> None:
        started = time.perf_counter()
        try:
            cycle = EncodedCycle(encode_cycle(avatar, codec, fps, self.kbps, self.gop))
        except Exception as error:  # noqa: BLE001 - sessions keep encoding idle frames live
            log.error("could not encode the idle cycle of %r (%s): %s", avatar.id, codec, error)
            return
        finally:
            with self._lock:
                self._building.discard(key)
        with self._lock:
            self._cycles[key] = cycle
            while len(self._cycles) > 1 and sum(c.nbytes for c in self._cycles.values()) > self.budget:
                self._cycles.popitem(last=False)
        log.info("idle cycle of %r encoded for %s at %d fps: %d frames, %.1f MB in %.1f s", avatar.id, codec, fps,
                 len(cycle), cycle.nbytes / 2**20, time.perf_counter() - started)

    def _forget(self, avatar_key: int) -> None:
        with self._lock:
            for key in [k for k in self._cycles if k[0] == avatar_key]:
                del self._cycles[key]

    def close(self) -> None:
        self._worker.shutdown(wait=False, cancel_futures=True)


def encode_cycle(avatar: Avatar, codec: str, fps: int, kbps: int, gop: int) -> list[EncodedFrame]:
    """The avatar's ping-pong cycle as one stream: a keyframe at 0 and every `gop` frames. A cycle
    shorter than `gop` (a photo's is 2 frames) is repeated up to it, so its replay, which restarts
    at frame 0, still has a keyframe only every `gop` frames."""
    width, height = avatar.size
    cycle = 2 * avatar.frame_count
    length = cycle * math.ceil(gop / cycle) if cycle < gop else cycle
    encoder = VideoEncoder(codec, width, height, fps, kbps, keyframe_interval=gop)
    reader = avatar.reader()
    try:
        return [encoder.encode(reader.frame(avatar.cycle_index(j)), keyframe=j % gop == 0) for j in range(length)]
    finally:
        reader.close()
        encoder.close()
