"""Admission control: work is let in by what it costs, a few wait, the rest hear when to retry.

Without it, every request is accepted and all of them finish late together (40 clips
of 7 s on the tiny stack: all answered after 3 minutes, 2.3 GB of front-end memory).
With it, a front end runs at most `capacity` units of work at once (frames to generate:
a clip's cost is its frames, seconds x fps), lets at most `queue` more requests wait,
each for at most `wait_s`, and refuses the rest at once with 429 and a Retry-After
estimated from how fast work has been finishing. A request bigger than the whole
capacity runs when it would be alone. Each kind of work (generations, avatar
preparations) has its own; live sessions have their slots (MUSETALK_MAX_LIVE_SESSIONS).
"""
from __future__ import annotations

import math
import threading
import time
from collections import deque
from contextlib import contextmanager

from frontend import metrics

RATE_WINDOW_S = 60.0


class Overloaded(RuntimeError):
    """The front end is at capacity: 429, with the seconds after which a retry should fit."""

    def __init__(self, message: str, retry_after: float):
        super().__init__(message)
        self.retry_after = max(1, math.ceil(retry_after))


class Admission:
    def __init__(self, kind: str, capacity: float, queue: int, wait_s: float, unit: str):
        self.kind, self.capacity, self.queue, self.wait_s, self.unit = kind, capacity, queue, wait_s, unit
        self.in_use = 0.0
        self.waiting = 0
        self.finished: deque[tuple[float, float]] = deque()  # (when, units) of the last RATE_WINDOW_S
        self._condition = threading.Condition()
        metrics.ADMISSION_CAPACITY.labels(kind).set(capacity)

    @property
    def rate(self) -> float | None:
        """Units finished per second over the last RATE_WINDOW_S (None if none finished)."""
        now = time.monotonic()
        while self.finished and now - self.finished[0][0] > RATE_WINDOW_S:
            self.finished.popleft()
        if not self.finished:
            return None
        return sum(units for _, units in self.finished) / max(1.0, now - self.finished[0][0])

    def retry_after(self, cost: float) -> float:
        """Seconds until `cost` more units would fit, at the recent pace (5 s until it is known)."""
        rate = self.rate
        return 5.0 if not rate else max(1.0, (self.in_use + cost - self.capacity) / rate)

    @contextmanager
    def admit(self, cost: float):
        """Hold `cost` units while the block runs; wait for them if allowed, else Overloaded."""
        self.acquire(cost)
        try:
            yield
        finally:
            self.release(cost)

    def acquire(self, cost: float) -> None:
        cost = min(cost, self.capacity)  # the biggest runs when it is alone
        with self._condition:
            if self.in_use + cost > self.capacity:
                if self.waiting >= self.queue:
                    self._refuse(cost, f"{self.waiting} requests are waiting already")
                self.waiting += 1
                metrics.ADMISSION_WAITING.labels(self.kind).inc()
                metrics.ADMISSIONS.labels(self.kind, "queued").inc()
                try:
                    deadline = time.monotonic() + self.wait_s
                    while self.in_use + cost > self.capacity:
                        left = deadline - time.monotonic()
                        if left <= 0:
                            self._refuse(cost, f"waited {self.wait_s:g} s")
                        self._condition.wait(left)
                finally:
                    self.waiting -= 1
                    metrics.ADMISSION_WAITING.labels(self.kind).dec()
            self.in_use += cost
            metrics.ADMISSION_IN_USE.labels(self.kind).set(self.in_use)
            metrics.ADMISSIONS.labels(self.kind, "admitted").inc()

    def release(self, cost: float) -> None:
        cost = min(cost, self.capacity)
        with self._condition:
            self.in_use -= cost
            self.finished.append((time.monotonic(), cost))
            metrics.ADMISSION_IN_USE.labels(self.kind).set(self.in_use)
            self._condition.notify_all()

    def _refuse(self, cost: float, why: str) -> None:
        metrics.ADMISSIONS.labels(self.kind, "refused").inc()
        retry = self.retry_after(cost)
        raise Overloaded(f"at capacity for {self.kind} ({self.in_use:g} of {self.capacity:g} {self.unit} "
                         f"in progress; {why}); retry in about {math.ceil(retry)} s", retry)
