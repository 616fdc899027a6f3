"""A session whose Triton goes away mid-segment and comes back: a real local Triton of its own,
killed and started again on the same ports, under a real front end and a real WebRTC viewer.
The session stays up and idle, the segment in flight ends with an error event, and new
segments play once Triton is back."""
from __future__ import annotations

import asyncio
import time

import httpx
import numpy as np
import pytest

from client.sessions import AvatarSession
from stack.frontend_process import FrontEnd
from support import BUILD
from triton_local.repository import generate
from triton_local.server import LocalTriton, Ports, free_port

FPS = 12


def tone(seconds: float) -> bytes:
    t = np.arange(int(seconds * 16000)) / 16000
    return (0.3 * np.sin(2 * np.pi * 220 * t) * 32767).astype("<i2").tobytes()


@pytest.fixture(scope="module")
def own_triton(tiny_onnx):
    repository = BUILD / "triton_repository_faults"
    generate(repository, tiny_onnx)
    server = LocalTriton(repository, Ports.free(), log_file=BUILD / "triton-faults.log").start(timeout=300)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def faulty(own_triton, frontend_server):
    server = FrontEnd(own_triton.grpc_url, free_port(), log_file=BUILD / "frontend-faults.log", host="127.0.0.1",
                      env={"MUSETALK_AVATAR_DIR": frontend_server.env["MUSETALK_AVATAR_DIR"]}).start()
    assert server.wait_until_ready(120), f"never ready; see {server.log_file}"
    yield server
    server.stop()


def test_triton_killed_mid_segment_and_restarted_leaves_the_session_serving(faulty, own_triton):
    async def scenario():
        async with await AvatarSession.open(faulty.url, fps=FPS, silence_dbfs=None) as session:
            viewer = await session.watch()
            speech = await session.speech(16000)
            await speech.send(tone(20))
            await speech.end_segment()
            await speech.event("speech_started", timeout=30)
            await asyncio.to_thread(own_triton.stop)  # killed mid-segment
            error = await speech.event("error", timeout=30)
            finished = await speech.event("speech_finished", timeout=30)
            await asyncio.sleep(1.0)
            status = await session.status()
            while viewer.video.qsize():
                viewer.video.get_nowait()
            idle_frames = [await asyncio.wait_for(viewer.video.get(), 10) for _ in range(FPS)]
            await asyncio.to_thread(own_triton.start, 300)  # back, on the same ports
            back = time.monotonic()
            deadline = back + 60
            while True:  # the front end sees it again (its readiness check), then a new segment plays
                if httpx.get(f"{faulty.url}/readyz").status_code == 200:
                    break
                assert time.monotonic() < deadline, "the front end never saw Triton again"
                await asyncio.sleep(0.2)
            await speech.send(tone(1.5))
            await speech.end_segment()
            started = await speech.event("speech_started", timeout=60)
            again = await speech.event("speech_finished", timeout=60)
            return error, finished, status, idle_frames, started, again, time.monotonic() - back

    error, finished, status, idle_frames, started, again, _ = asyncio.run(scenario())
    assert error["segment"] == 1 and error["status"] in (502, 503), error
    assert finished["segment"] == 1 and finished["interrupted"] is True
    assert status["state"] == "idle" and status["error"] is None and status["segments"]["interrupted"] == 1
    assert all(r.frame is not None for r in idle_frames)  # the avatar stayed on screen
    assert started["segment"] == again["segment"] == 2 and again["interrupted"] is False
