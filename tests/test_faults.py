"""A session whose Triton dies mid-segment: a real local Triton of its own, killed outright (what
an abort looks like) and started again on the same ports by its supervisor, as `make serve` runs
it, under a real front end and a real WebRTC viewer. The session stays up and idle, the segment
in flight ends with an error event, new segments play once Triton is back, and the front end
counts the outage."""
from __future__ import annotations

import asyncio
import os
import signal
import time

import httpx
import numpy as np
import pytest

from client.readiness import wait_for
from client.sessions import AvatarSession
from stack.frontend_process import FrontEnd
from support import BUILD
from triton_local.processes import free_port, http_ok
from triton_local.repository import generate
from triton_local.server import LocalTriton, Ports
from triton_local.supervisor import Supervisor

FPS = 12


def tone(seconds: float) -> bytes:
    t = np.arange(int(seconds * 16000)) / 16000
    return (0.3 * np.sin(2 * np.pi * 220 * t) * 32767).astype("<i2").tobytes()


@pytest.fixture(scope="module")
def own_triton(tiny_onnx):
    repository = BUILD / "triton_repository_faults"
    generate(repository, tiny_onnx)
    server = LocalTriton(repository, Ports.free(), log_file=BUILD / "triton-faults.log").start(timeout=300)
    supervisor = Supervisor(server).start()
    yield supervisor
    supervisor.stop()


@pytest.fixture(scope="module")
def faulty(own_triton, frontend_server):
    server = FrontEnd(own_triton.server.grpc_url, free_port(), log_file=BUILD / "frontend-faults.log", host="127.0.0.1",
                      env={"MUSETALK_AVATAR_DIR": frontend_server.env["MUSETALK_AVATAR_DIR"]}).start()
    assert server.wait_until_ready(120), f"never ready; see {server.log_file}"
    yield server
    server.stop()


def metric(url: str, name: str) -> float:
    line = next(line for line in httpx.get(f"{url}/metrics").text.splitlines() if line.startswith(name + " "))
    return float(line.split()[1])


def test_triton_killed_mid_segment_is_restarted_and_the_session_speaks_again(faulty, own_triton):
    outages = metric(faulty.url, "musetalk_triton_outages_total")

    async def scenario():
        async with await AvatarSession.open(faulty.url, fps=FPS, silence_dbfs=None) as session:
            viewer = await session.watch()
            speech = await session.speech(16000)
            await speech.send(tone(20))
            await speech.end_segment()
            await speech.event("speech_started", timeout=30)
            os.kill(own_triton.server.process.pid, signal.SIGKILL)  # killed mid-segment
            killed = time.monotonic()
            error = await speech.event("error", timeout=30)
            finished = await speech.event("speech_finished", timeout=30)
            await asyncio.sleep(1.0)
            status = await session.status()
            while viewer.video.qsize():
                viewer.video.get_nowait()
            idle_frames = [await asyncio.wait_for(viewer.video.get(), 10) for _ in range(FPS)]
            # its supervisor starts it again on the same ports; the front end's readiness sees it back
            assert await asyncio.to_thread(wait_for, lambda: http_ok(f"{faulty.url}/readyz"), 120, 0.2), \
                "the front end never saw Triton again"
            await speech.send(tone(1.5))
            await speech.end_segment()
            started = await speech.event("speech_started", timeout=60)
            again = await speech.event("speech_finished", timeout=60)
            return error, finished, status, idle_frames, started, again, time.monotonic() - killed

    error, finished, status, idle_frames, started, again, _ = asyncio.run(scenario())
    assert error["segment"] == 1 and error["status"] in (502, 503), error
    assert finished["segment"] == 1 and finished["interrupted"] is True
    assert status["state"] == "idle" and status["error"] is None and status["segments"]["interrupted"] == 1
    assert all(r.frame is not None for r in idle_frames)  # the avatar stayed on screen
    assert started["segment"] == again["segment"] == 2 and again["interrupted"] is False
    assert own_triton.restarts == 1 and own_triton.crashes[0].status == "killed by SIGKILL"
    assert metric(faulty.url, "musetalk_triton_outages_total") == outages + 1
    assert metric(faulty.url, "musetalk_triton_ready") == 1
