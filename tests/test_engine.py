"""The session engine on a clock the test drives: every live path (conversational sessions and
/ws/live) runs on it; here its ticks are checked turn by turn, without sleeping."""
from __future__ import annotations

import json

import numpy as np

from frontend.avatars.frames import FramesWriter
from frontend.avatars.store import AvatarStore, save_material
from frontend.sessions.idle import IdleCycles
from frontend.sessions.session import REBASE_S, Clock, Session, SessionOptions

FPS = 25


def still_avatar(folder):
    """A 64x64 avatar of one grey frame, without a face (nothing to call Triton for)."""
    staging = folder / ".staging"
    staging.mkdir()
    writer = FramesWriter(staging / "frames.mp4", 64, 64)
    writer.write(np.full((64, 64, 3), 90, np.uint8))
    writer.close()
    save_material(staging, [None], np.zeros((1, 8, 32, 32), np.float32), [None])
    (staging / "meta.json").write_text(json.dumps({"id": "still", "width": 64, "height": 64, "format": 2}))
    store = AvatarStore(folder)
    store.publish("still", staging)
    return store.load("still")


def test_a_session_makes_a_frame_per_tick_of_its_clock_and_moves_it_rather_than_burst(tmp_path):
    now = [1000.0]
    session = Session("s", still_avatar(tmp_path), None, SessionOptions(fps=FPS), IdleCycles(1500, gop=50),
                      clock=Clock(FPS, lambda: now[0]))

    def turns(count: int = 20) -> int:
        for _ in range(count):
            assert session.turn(wait=False)
        return session.timeline.n

    def run_for(seconds: float, step: float = 0.005) -> int:
        for _ in range(round(seconds / step)):
            now[0] += step
            turns(3)
        return session.timeline.n

    assert turns() == 0  # nothing is due yet (the clock starts 50 ms ahead)
    assert run_for(1.0) == FPS  # a second: a frame per tick, each made 20 ms before it is due
    assert session.clock.rebased == 0
    now[0] += 5.0  # the thread held back for 5 s (a loaded machine)
    assert turns() == FPS + 1 > FPS  # one frame now, and the clock moved: no burst of 125 late frames
    assert session.clock.rebased == 1 and 5.0 > REBASE_S
    assert run_for(1.0) == 2 * FPS + 1
    assert session.timeline.counts["idle"] == 2 * FPS + 1 and session.state == "idle"
    session.close()
    session.run()  # reads the close, and releases what it holds
    assert session.closed.is_set()
