"""Live work first: Triton serves a session's first frames before offline work queued ahead of
them, and the front end's offline work waits while someone waits for a live frame."""
from __future__ import annotations

import threading
import time

from client import MuseTalkClient
from contract import specs
from contract.priority import DEFAULT, LEVELS, Priority
from frontend.live_first import LiveFirst
from frontend.sessions.segments import Segment
from frontend.sessions.session import SessionOptions
from support import frames

QUEUED = 12  # 32-frame offline requests sent before the one whose place is measured


def finishing_place(grpc_url: str, urgent: Priority, priorities: bool = True) -> int:
    """QUEUED 32-frame requests at the offline level, then, once the first is back (the others are
    queued on the server by then), one 1-frame request at `urgent`: the place (0..QUEUED) in which
    its answer came back."""
    audio, latents = frames(32)
    with MuseTalkClient(grpc_url, max_in_flight=2 * QUEUED, priorities=priorities) as client:
        queued = [client.submit(client.musetalk, audio, latents, priority=Priority.OFFLINE) for _ in range(QUEUED)]
        queued[0].result()
        last = client.submit(client.musetalk, audio[:1], latents[:1], priority=urgent)
        order: list[int] = []
        for number, future in enumerate([*queued, last]):
            future.add_done_callback(lambda _, number=number: order.append(number))
        for future in [*queued, last]:
            future.result()
    return order.index(QUEUED)


def test_urgent_requests_overtake_the_work_queued_before_them(triton):
    """Triton serves its queues in priority order, through the ensemble's three steps, and the local
    server answers a request as soon as its own frames are done: a session's first frame sent
    behind full batches of offline work comes back after at most those under way in the unet and
    the decoder (one an instance). At the offline level, or with priorities off, it waits for every
    request queued before it, and only those still under way beside it finish after it."""
    with MuseTalkClient(triton.grpc_url) as client:
        under_way = sum(int(group.get("count", 1)) for model in ("unet", "vae_decoder")
                        for group in client.model_config(model)["instance_group"])
    assert finishing_place(triton.grpc_url, Priority.SEGMENT_START) <= under_way
    assert finishing_place(triton.grpc_url, Priority.OFFLINE) >= QUEUED - (under_way - 1) > under_way
    assert finishing_place(triton.grpc_url, Priority.SEGMENT_START, priorities=False) >= QUEUED - (under_way - 1)


def test_every_model_queues_by_the_contracts_priority_levels(triton):
    """The levels are declared in model_repository/ (the GPU configs) and served as declared."""
    with MuseTalkClient(triton.grpc_url) as client:
        for model in specs.NETWORKS:
            batching = client.model_config(model)["dynamic_batching"]
            assert int(batching["priority_levels"]) == LEVELS, model
            assert int(batching["default_priority_level"]) == DEFAULT, model


def test_offline_work_waits_while_a_live_frame_is_awaited_and_goes_on_after():
    live = LiveFirst(max_pause_s=10)
    assert live.give_way() == 0.0  # nothing awaited: no wait at all
    segment = object()
    live.awaited(segment)
    waited: list[float] = []
    offline = threading.Thread(target=lambda: waited.append(live.give_way()))
    offline.start()
    offline.join(0.2)
    assert offline.is_alive()  # held meanwhile
    live.arrived(segment)  # the segment's first frame plays
    offline.join(5)
    assert not offline.is_alive() and 0.15 < waited[0] < 5


def test_offline_work_never_waits_longer_than_its_bound_nor_at_all_with_priorities_off():
    live = LiveFirst(max_pause_s=0.3)
    live.awaited("a segment that never plays")
    started = time.monotonic()
    assert 0.25 < live.give_way() < 2 and time.monotonic() - started < 2
    off = LiveFirst(enabled=False)
    off.awaited("a segment")
    assert off.give_way() == 0.0


def test_a_segment_asks_first_until_it_plays():
    segment = Segment(1, None, None, fps=25, sample_rate=16000, start=0, options=SessionOptions())
    assert segment.utterance.priority() == Priority.SEGMENT_START
    segment.played = 1
    assert segment.utterance.priority() == Priority.SESSION


def test_offline_work_gives_way_at_most_half_of_the_time(monkeypatch):
    """However often segments start, offline work pauses at most MAX_SHARE of any WINDOW_S."""
    from frontend import live_first as module

    monkeypatch.setattr(module, "WINDOW_S", 2.0)
    live = LiveFirst(max_pause_s=10)
    live.awaited("a segment that is always starting")
    started = time.monotonic()
    paused = [live.give_way() for _ in range(3)]
    assert 0.9 < paused[0] < 1.5 and paused[1:] == [0.0, 0.0]  # 1 s of the 2 s window, then none
    assert time.monotonic() - started < 2
