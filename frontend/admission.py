"""Admission control: work is let in by what it costs, a few wait, the rest hear when to retry.

Without it, every request is accepted and all of them finish late together (40 clips
of 7 s on the tiny stack: all answered after 3 minutes, 2.3 GB of front-end memory).
With it, a front end runs at most `capacity` units of work at once (frames to generate:
a clip's cost is its frames, seconds x fps), lets at most `queue` more requests wait,
each for at most `wait_s`, and refuses the rest at once with 429 and a Retry-After
estimated from how fast work has been finishing. A request bigger than the whole
capacity runs when it would be alone. Each kind of work (generations, avatar
preparations) has its own; live sessions have their slots (MUSETALK_MAX_LIVE_SESSIONS).

Where the operator sets a time limit (MUSETALK_MAX_REQUEST_SECONDS) and the server's pace
is known (seconds per unit, measured by the client: client.deadlines), the capacity is also
what the server finishes within that limit: a request that alone would take longer is
refused at once (503 with the estimate), not failed after minutes; one that fits alone
but not beside the work in progress waits, or hears when to retry (429).
"""
from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable
from contextlib import contextmanager

from frontend import metrics
from frontend.exceptions import TooManySessions

RATE_WINDOW_S = 60.0
# Work too long for this server may fit once its pace is measured again (a less busy server,
# another replica behind the same address): worth a retry, not soon.
RETRY_TOO_LONG_S = 60.0


class Overloaded(RuntimeError):
    """The front end is at capacity: 429, with the seconds after which a retry should fit;
    `details` go into the JSON answer beside the message."""

    def __init__(self, message: str, retry_after: float, **details):
        super().__init__(message)
        self.retry_after = max(1, math.ceil(retry_after))
        self.details = details


class TooLong(Overloaded):
    """Work the server would need longer for than the operator's time limit, even alone: 503."""


class LiveSlots:
    """The front end's live sessions, conversational and /ws/live together: `take` one or
    TooManySessions (a 429), counted in musetalk_admissions_total{kind="session"}. A tenant
    holds at most `per_tenant` of them (None: no limit of its own)."""

    def __init__(self, limit: int, per_tenant: int | None = None):
        self.limit, self.per_tenant, self._free = limit, per_tenant, threading.BoundedSemaphore(limit)
        self._held: dict[str | None, int] = {}
        self._lock = threading.Lock()

    def take(self, tenant: str | None = None) -> None:
        with self._lock:
            if tenant is not None and self.per_tenant is not None and self._held.get(tenant, 0) >= self.per_tenant:
                metrics.ADMISSIONS.labels("session", "refused").inc()
                raise TooManySessions(f"tenant {tenant!r} holds {self.per_tenant} live sessions, its limit "
                                      "(MUSETALK_TENANT_LIVE_SESSIONS); end one or retry later")
            if not self._free.acquire(blocking=False):
                metrics.ADMISSIONS.labels("session", "refused").inc()
                raise TooManySessions(f"all {self.limit} live sessions are taken; retry later")
            self._held[tenant] = self._held.get(tenant, 0) + 1
        metrics.ADMISSIONS.labels("session", "admitted").inc()
        metrics.LIVE_SLOTS_IN_USE.inc()

    def release(self, tenant: str | None = None) -> None:
        with self._lock:
            self._held[tenant] -= 1
            if not self._held[tenant]:
                del self._held[tenant]
        self._free.release()
        metrics.LIVE_SLOTS_IN_USE.dec()


class Admission:
    def __init__(self, kind: str, capacity: float, queue: int, wait_s: float, unit: str,
                 pace: Callable[[], float | None] = lambda: None, limit_s: float | None = None,
                 per_tenant: float | None = None):
        self.kind, self.capacity, self.queue, self.wait_s, self.unit = kind, capacity, queue, wait_s, unit
        self.pace, self.limit_s = pace, limit_s  # seconds per unit (None: not measured yet); the limit
        self.per_tenant = per_tenant  # what one tenant may have in progress (None: no limit of its own)
        self.tenants: dict[str, float] = {}
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

    def timed_capacity(self) -> float | None:
        """The units the server finishes within the time limit at its measured pace (None: no
        limit, or no pace measured yet)."""
        pace = self.pace()
        return self.limit_s / pace if self.limit_s and pace else None

    def capacity_now(self) -> float:
        timed = self.timed_capacity()
        return self.capacity if timed is None else min(self.capacity, timed)

    def retry_after(self, cost: float) -> float:
        """Seconds until `cost` more units would fit, at the recent pace (5 s until it is known)."""
        rate = self.rate
        return 5.0 if not rate else max(1.0, (self.in_use + cost - self.capacity_now()) / rate)

    @contextmanager
    def admit(self, cost: float, tenant: str | None = None):
        """Hold `cost` units while the block runs; wait for them if allowed, else Overloaded."""
        self.acquire(cost, tenant)
        try:
            yield
        finally:
            self.release(cost, tenant)

    def acquire(self, cost: float, tenant: str | None = None) -> None:
        self._refuse_if_too_long(cost)
        cost = min(cost, self.capacity)  # the biggest runs when it is alone
        with self._condition:
            self._refuse_beyond_tenant(cost, tenant)
            if self.in_use + cost > self.capacity_now():
                if self.waiting >= self.queue:
                    self._refuse(cost, f"{self.waiting} requests are waiting already")
                self.waiting += 1
                metrics.ADMISSION_WAITING.labels(self.kind).inc()
                metrics.ADMISSIONS.labels(self.kind, "queued").inc()
                try:
                    deadline = time.monotonic() + self.wait_s
                    while self.in_use + cost > self.capacity_now():
                        left = deadline - time.monotonic()
                        if left <= 0:
                            self._refuse(cost, f"waited {self.wait_s:g} s")
                        self._condition.wait(left)
                finally:
                    self.waiting -= 1
                    metrics.ADMISSION_WAITING.labels(self.kind).dec()
            self.in_use += cost
            if tenant is not None:
                self.tenants[tenant] = self.tenants.get(tenant, 0.0) + cost
            metrics.ADMISSION_IN_USE.labels(self.kind).set(self.in_use)
            metrics.ADMISSIONS.labels(self.kind, "admitted").inc()

    def release(self, cost: float, tenant: str | None = None) -> None:
        cost = min(cost, self.capacity)
        with self._condition:
            if tenant is not None:
                self.tenants[tenant] -= cost
                if self.tenants[tenant] <= 0:
                    del self.tenants[tenant]
            self.in_use -= cost
            self.finished.append((time.monotonic(), cost))
            metrics.ADMISSION_IN_USE.labels(self.kind).set(self.in_use)
            self._condition.notify_all()

    def _refuse(self, cost: float, why: str) -> None:
        metrics.ADMISSIONS.labels(self.kind, "refused").inc()
        retry = self.retry_after(cost)
        pace = self.pace()
        estimate = {"estimated_seconds": round((self.in_use + cost) * pace, 1)} if pace else {}
        raise Overloaded(f"at capacity for {self.kind} ({self.in_use:g} of {self.capacity_now():.0f} {self.unit} "
                         f"in progress; {why}); retry in about {math.ceil(retry)} s", retry, **estimate)

    def _refuse_beyond_tenant(self, cost: float, tenant: str | None) -> None:
        """One tenant never takes the whole front end: beyond its own share it hears when to retry."""
        if tenant is None or self.per_tenant is None:
            return
        held = self.tenants.get(tenant, 0.0)
        if held and held + cost > self.per_tenant:
            metrics.ADMISSIONS.labels(self.kind, "refused").inc()
            rate = self.rate
            retry = 5.0 if not rate else max(1.0, (held + cost - self.per_tenant) / rate)
            raise Overloaded(f"tenant {tenant!r} has {held:g} {self.unit} of {self.kind} in progress; its limit is "
                             f"{self.per_tenant:g} (MUSETALK_TENANT_FRAMES_IN_PROGRESS); retry in about "
                             f"{math.ceil(retry)} s", retry)

    def _refuse_if_too_long(self, cost: float) -> None:
        timed, pace = self.timed_capacity(), self.pace()
        if timed is None or cost <= timed:
            return
        metrics.ADMISSIONS.labels(self.kind, "too_long").inc()
        estimate = cost * pace
        raise TooLong(
            f"{cost:g} {self.unit} would take this server about {estimate:.0f} s ({pace:.3g} s each, as "
            f"measured), over its {self.limit_s:g} s limit (MUSETALK_MAX_REQUEST_SECONDS): send less at once",
            RETRY_TOO_LONG_S, estimated_seconds=round(estimate, 1), limit_seconds=self.limit_s,
            seconds_per_unit=round(pace, 4))
