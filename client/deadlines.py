"""Deadlines from the work: how long a request may take follows from what is ahead of it and
how fast the server has been answering, never from a clock chosen for another machine.

A CPU serving the full-size models makes a frame in seconds, a GPU in milliseconds: no
fixed deadline suits both, and a fixed one kills the requests queued behind the first
ones on a slow server while it is still working. So each model's requests are timed here:

- the pace: while this client has requests of a model in flight, the items answered over
  the time it was busy give the server's seconds per item (answers merged into one
  execution by Triton's batcher count together; older answers fade after WINDOW_ITEMS);
- a request's deadline: SLACK times the pace of the work ahead of it, its own included
  (a request queued behind others is never timed out for their work), and never under
  FLOOR_S; before the first answer of a model its pace is unknown, and the deadline is
  UNKNOWN_S.

A deadline that still expires says which model, how long the request waited behind the
ones sent before it, and how long it then was first in line without an answer.
"""
from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

from client.errors import DeadlineExceeded, TritonClientError, translate

FLOOR_S = 60.0
SLACK = 4.0
UNKNOWN_S = 3600.0
WINDOW_ITEMS = 256


@dataclass
class Ticket:
    """One request of `items` items on its way to the server."""

    model: str
    items: int
    ahead: int  # items of the same model this client had in flight when it was sent
    pace: float | None  # the server's seconds per item when it was sent
    deadline_s: float
    sent: float = field(default_factory=time.monotonic)
    first_in_line: float | None = None  # when every request sent before it had its answer
    done: bool = False

    def failure(self, error: BaseException) -> TritonClientError:
        """What this request's failure raises: one of client.errors; an expired deadline says
        what the request waited for."""
        failure = translate(error, self.model)
        return self.expired() if isinstance(failure, DeadlineExceeded) else failure

    def expired(self) -> DeadlineExceeded:
        now = time.monotonic()
        head = self.first_in_line or now
        basis = (f"{self.ahead + self.items} items at {self.pace:.3g} s each, as measured" if self.pace
                 else "no pace measured yet")
        return DeadlineExceeded(
            f"no answer within its {self.deadline_s:.0f} s deadline ({basis}): {self.items} items, sent behind "
            f"{self.ahead}; it waited {head - self.sent:.0f} s for those, then {now - head:.0f} s first in line",
            self.model)


@dataclass
class _Model:
    in_flight: OrderedDict = field(default_factory=OrderedDict)  # id(ticket) -> ticket, in sending order
    busy_s: float = 0.0
    answered: float = 0.0  # items
    mark: float = 0.0  # the last time busy time was counted to


class Deadlines:
    """Each model's pace and each request's deadline. `fixed_s` gives every request that
    deadline instead (the pace is measured all the same); `floor_s` is the shortest deadline
    the pace may give. Thread-safe."""

    def __init__(self, fixed_s: float | None = None, floor_s: float = FLOOR_S):
        self.fixed_s, self.floor_s = fixed_s, floor_s
        self._models: dict[str, _Model] = {}
        self._lock = threading.Lock()

    def seconds_per_item(self, model: str) -> float | None:
        """The server's measured seconds per item of `model` (None before its first answer)."""
        with self._lock:
            m = self._models.get(model)
            return m.busy_s / m.answered if m and m.answered else None

    def start(self, model: str, items: int) -> Ticket:
        now = time.monotonic()
        with self._lock:
            m = self._models.setdefault(model, _Model())
            if not m.in_flight:
                m.mark = now  # a busy period begins
            ahead = sum(t.items for t in m.in_flight.values())
            pace = m.busy_s / m.answered if m.answered else None
            if self.fixed_s is not None:
                deadline = self.fixed_s
            else:
                deadline = max(self.floor_s, SLACK * pace * (ahead + items)) if pace else UNKNOWN_S
            ticket = Ticket(model, items, ahead, pace, deadline, now, now if not ahead else None)
            m.in_flight[id(ticket)] = ticket
            return ticket

    def finish(self, ticket: Ticket, answered: bool) -> None:
        """`ticket`'s request ended: answered (its time counts toward the pace), or failed or
        cancelled (its time carries over to the next answer). A second call does nothing."""
        now = time.monotonic()
        with self._lock:
            if ticket.done:
                return
            ticket.done = True
            m = self._models[ticket.model]
            m.in_flight.pop(id(ticket), None)
            if answered:
                m.busy_s += now - m.mark
                m.answered += ticket.items
                m.mark = now
                if m.answered > WINDOW_ITEMS:  # older answers fade: the pace follows the server
                    m.busy_s, m.answered = m.busy_s / 2, m.answered / 2
            if m.in_flight:
                head = next(iter(m.in_flight.values()))
                head.first_in_line = head.first_in_line or now
