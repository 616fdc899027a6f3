"""Deadlines from the work (client.deadlines), against the real local Triton: a request queued
behind others is given the time their work needs at the server's measured pace; a fixed deadline
that still expires says what the request waited for."""
from __future__ import annotations

import time
from concurrent.futures import wait

import pytest

from client import DeadlineExceeded, MuseTalkClient
from client.deadlines import SLACK, UNKNOWN_S, Deadlines
from contract import specs
from support import frames

BATCH = specs.MUSETALK.max_batch_size
REQUESTS = 8


def test_the_pace_counts_answers_merged_into_one_execution_together():
    """Four requests answered at once (Triton's batcher merged them) took the time of one
    execution for four requests' items: the pace is that time over all their items."""
    deadlines = Deadlines()
    tickets = [deadlines.start("musetalk", 4) for _ in range(4)]
    assert [t.ahead for t in tickets] == [0, 4, 8, 12]
    assert tickets[0].deadline_s == UNKNOWN_S  # nothing measured yet
    time.sleep(0.2)
    for ticket in tickets:
        deadlines.finish(ticket, answered=True)
    pace = deadlines.seconds_per_item("musetalk")
    assert 0.2 / 16 <= pace < 0.3 / 16
    deadlines.finish(tickets[0], answered=True)  # a second finish changes nothing
    assert deadlines.seconds_per_item("musetalk") == pace
    assert deadlines.seconds_per_item("unet") is None


def test_a_request_behind_others_gets_the_time_their_work_needs():
    deadlines = Deadlines(floor_s=0.01)
    first = deadlines.start("musetalk", 10)
    time.sleep(0.1)
    deadlines.finish(first, answered=True)  # 10 ms per item
    alone = deadlines.start("musetalk", 10)
    behind = deadlines.start("musetalk", 10)
    assert behind.deadline_s == pytest.approx(alone.deadline_s * 2, rel=0.01)
    assert alone.deadline_s == pytest.approx(SLACK * 10 * deadlines.seconds_per_item("musetalk"))
    assert alone.first_in_line is not None and behind.first_in_line is None
    deadlines.finish(alone, answered=True)
    assert behind.first_in_line is not None  # the one ahead answered: now it is first in line


def test_requests_queued_behind_a_long_queue_all_finish(triton):
    """Eight full batches sent at once: the last waits for the seven before it. Its deadline,
    from the measured pace, covers that; a deadline as short as the first request's (the old
    fixed clock, scaled to this server) would have killed the last ones."""
    audio, latents = frames(BATCH, seed=11)
    with MuseTalkClient(triton.grpc_url, max_in_flight=REQUESTS) as client:
        client.deadlines.floor_s = 0.0  # the pace alone sets the deadlines here
        client.musetalk(audio, latents)  # the pace is measured
        started = time.monotonic()
        futures = [client.submit(client.musetalk, audio, latents) for _ in range(REQUESTS)]
        tickets = [f.tickets[0] for f in futures]
        done, _ = wait(futures)
        elapsed = time.monotonic() - started
    assert all(f.exception() is None for f in done)
    assert [t.ahead for t in tickets] == [BATCH * k for k in range(REQUESTS)]
    for t in tickets:
        assert t.deadline_s == pytest.approx(SLACK * t.pace * (t.ahead + t.items))
    assert elapsed > tickets[0].deadline_s  # the last would have expired on the first one's deadline


def test_an_expired_deadline_says_what_the_request_waited_for(triton):
    """A fixed deadline that falls inside the queue (halfway between when the first and the last
    of the same eight requests were answered in a run just before) lets the front of the queue
    finish and kills its end; each expired request says its model, how long it waited behind
    the others and how long it was first in line.

    The deadline comes from answer times measured in the same run, not from a fraction of the
    whole queue: on a busy 2-core machine the first request, sharing the cores with the
    pipeline steps of the others, once took more than a third of the whole queue."""
    audio, latents = frames(BATCH, seed=12)
    answered = []
    with MuseTalkClient(triton.grpc_url, max_in_flight=REQUESTS) as client:
        client.musetalk(audio, latents)
        started = time.monotonic()
        futures = [client.submit(client.musetalk, audio, latents) for _ in range(REQUESTS)]
        for future in futures:
            future.add_done_callback(lambda _: answered.append(time.monotonic() - started))
        wait(futures)
    deadline_s = (min(answered) + max(answered)) / 2
    with MuseTalkClient(triton.grpc_url, max_in_flight=REQUESTS, timeout_s=deadline_s) as client:
        futures = [client.submit(client.musetalk, audio, latents) for _ in range(REQUESTS)]
        wait(futures)
        failures = [f.exception() for f in futures if f.exception() is not None]
    # the front of the queue finishes, the end does not
    assert 0 < len(failures) < REQUESTS and futures[-1].exception() is not None, (answered, deadline_s)
    for failure in failures:
        assert isinstance(failure, DeadlineExceeded)
        message = str(failure)
        assert message.startswith("musetalk: no answer within its")
        assert "sent behind" in message and "it waited" in message and "first in line" in message
