"""Offline work gives way to live work in the front end, as Triton's queues do (contract/priority.py).

A session's thread makes frames due within milliseconds; POST /onnx-infer blends and encodes
a minute of video that nobody watches yet, and an avatar's preparation finds faces in hundreds
of frames. They share the front end's cores and its interpreter (one thread at a time runs
Python), and they share Triton. While someone waits for a live frame, offline work waits too:
it sends nothing new to Triton and does no CPU work of its own (LiveFirst.give_way).

(Running offline work on threads at a lower OS priority was measured and dropped: a thread that
the OS holds back while it holds the interpreter's lock holds the sessions' threads back with it.)
"""
from __future__ import annotations

import threading
import time
from collections import deque

from frontend import metrics

MAX_PAUSE_S = 2.0  # offline work waits at most this long for live work at a time
WINDOW_S, MAX_SHARE = 20.0, 0.5  # and at most half of any 20 s: it never starves, however busy live work is


class LiveFirst:
    """Live work says when someone is waiting for it; offline work gives way meanwhile.

    A session's segment from its first audio until its first frame plays, and a /ws/live session
    until its first frame has left, are *awaited*: while any is, offline work sends nothing new
    to Triton and pauses its own CPU work (`give_way`: at most MAX_PAUSE_S at a time, and at most
    MAX_SHARE of the last WINDOW_S, so it never starves however often segments start), and the
    cores are the live work's for those few hundred milliseconds. Frames of
    live work already playing need no pause: their requests go before offline ones in Triton's
    queues. With `enabled=False` (MUSETALK_PRIORITIES off) nothing gives way."""

    def __init__(self, enabled: bool = True, max_pause_s: float = MAX_PAUSE_S):
        self.enabled, self.max_pause_s = enabled, max_pause_s
        self._awaited: set = set()
        self._changed = threading.Condition()
        self._pauses: deque[tuple[float, float]] = deque()  # (start, end) of recent pauses

    # -- live work --------------------------------------------------------------------------
    def awaited(self, key) -> None:
        """Someone waits for `key`'s first frame (a segment, a live session)."""
        with self._changed:
            self._awaited.add(key)

    def arrived(self, key) -> None:
        """`key`'s first frame is out, or it ended without one (idempotent)."""
        with self._changed:
            self._awaited.discard(key)
            self._changed.notify_all()

    # -- offline work -----------------------------------------------------------------------
    def give_way(self) -> float:
        """Wait while live work is awaited (at most `max_pause_s`); the seconds waited."""
        if not self.enabled:
            return 0.0
        with self._changed:
            if not self._awaited:
                return 0.0
            started = time.monotonic()
            allowed = min(self.max_pause_s, MAX_SHARE * WINDOW_S - self._paused_since(started - WINDOW_S))
            if allowed <= 0:
                return 0.0
            self._changed.wait_for(lambda: not self._awaited, allowed)
            ended = time.monotonic()
            self._pauses.append((started, ended))
        metrics.OFFLINE_PAUSED.inc(ended - started)
        return ended - started

    def _paused_since(self, since: float) -> float:
        """Seconds offline work paused after `since` (pauses of several offline requests at once overlap)."""
        self._pauses = deque(p for p in self._pauses if p[1] > since)
        total, reach = 0.0, since
        for start, end in sorted(self._pauses):
            start = max(start, reach)
            if end > start:
                total, reach = total + end - start, end
        return total
