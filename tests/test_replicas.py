"""Stateless front ends: two replicas (two uvicorn processes) on one Triton and one shared avatar
folder, as two pods on a ReadWriteMany volume; and the metrics they serve."""
from __future__ import annotations

import asyncio
import io
import math
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import av
import httpx
import numpy as np
import pytest

from client.sessions import AvatarSession
from stack.balancer import LocalBalancer
from stack.frontend_process import FrontEnd
from support import BUILD, speech_seconds
from triton_local.processes import free_port


@pytest.fixture(scope="module")
def replicas(triton, tmp_path_factory):
    store = tmp_path_factory.mktemp("shared-avatars")
    started = [FrontEnd(triton.grpc_url, free_port(), host="127.0.0.1", log_file=BUILD / f"replica-{name}.log",
                        env={"MUSETALK_AVATAR_DIR": str(store), "MUSETALK_BATCH_SIZE": "8"}).start()
               for name in "ab"]
    yield started
    for replica in started:
        replica.stop()


def frames_of(video: bytes) -> int:
    with av.open(io.BytesIO(video)) as container:
        return sum(1 for _ in container.decode(video=0))


def test_an_avatar_prepared_through_one_replica_serves_through_the_other(replicas, face_png, speech_bytes):
    a, b = (httpx.Client(base_url=r.url, timeout=300) for r in replicas)
    assert a.post("/avatars", data={"avatar_id": "shared"}, files={"file": ("a.png", face_png)}).status_code == 201
    assert "shared" in [x["id"] for x in b.get("/avatars").json()["avatars"]]
    answer = b.post("/onnx-infer", data={"avatar_id": "shared"}, files={"audio_file": ("s.flac", speech_bytes)})
    assert answer.status_code == 200 and frames_of(answer.content) == math.floor(speech_seconds() * 25)

    assert a.delete("/avatars/shared").json() == {"deleted": "shared"}  # B has it cached: it must notice
    assert b.get("/avatars/shared").status_code == 404
    gone = b.post("/onnx-infer", data={"avatar_id": "shared"}, files={"audio_file": ("s.flac", speech_bytes)})
    assert gone.status_code == 404


def test_two_replicas_preparing_one_id_give_one_success_and_one_409(replicas, face_png):
    def prepare(replica):
        return httpx.post(f"{replica.url}/avatars", data={"avatar_id": "race"},
                          files={"file": ("a.png", face_png)}, timeout=300)

    with ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(prepare, replicas))
    assert sorted(r.status_code for r in answers) == [201, 409], [r.text for r in answers]
    for replica in replicas:
        assert httpx.get(f"{replica.url}/avatars/race").json()["status"] == "ready"


def test_requests_spread_over_both_replicas_give_correct_videos(replicas, face_png, speech_bytes):
    httpx.post(f"{replicas[0].url}/avatars", data={"avatar_id": "spread"}, files={"file": ("a.png", face_png)},
               timeout=300).raise_for_status()

    def speak(i: int) -> int:
        answer = httpx.post(f"{replicas[i % 2].url}/onnx-infer", data={"avatar_id": "spread"},
                            files={"audio_file": ("s.flac", speech_bytes)}, timeout=300)
        answer.raise_for_status()
        return frames_of(answer.content)

    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(speak, range(4))) == [math.floor(speech_seconds() * 25)] * 4


def test_metrics_count_requests_stages_and_sessions(replicas, speech_bytes):
    url = replicas[1].url
    httpx.post(f"{url}/onnx-infer", data={"avatar_id": "spread", "skip_save_images": "true"},
               files={"audio_file": ("s.flac", speech_bytes)}, timeout=300).raise_for_status()
    text = httpx.get(f"{url}/metrics").text
    assert 'musetalk_requests_total{method="POST",route="/onnx-infer",status="200"}' in text
    for stage in ("audio_features", "waiting_for_triton", "blending", "encoding", "total"):
        assert f'musetalk_stage_seconds_count{{stage="{stage}"}}' in text
    assert 'musetalk_first_frame_seconds_count{kind="whole"}' in text
    assert 'musetalk_frames_total{kind="whole"}' in text
    assert "musetalk_live_sessions 0.0" in text and "musetalk_streams_active 0.0" in text
    preparer = httpx.get(f"{replicas[0].url}/metrics").text  # the replica that prepared the avatars
    assert 'musetalk_avatar_preparations_total{result="ready"}' in preparer
    assert "# TYPE musetalk_live_latency_seconds histogram" in text


# -- sessions across replicas: routing by id, draining ----------------------------------------
@pytest.fixture(scope="module")
def routed(triton, tmp_path_factory, face_png):
    """Two replicas that forward each other's sessions, behind nginx (round robin, no cookie)."""
    store = tmp_path_factory.mktemp("routed-avatars")
    ports = [free_port(), free_port()]
    started = [FrontEnd(triton.grpc_url, port, host="127.0.0.1", log_file=BUILD / f"routed-{name}.log", env={
        # no MUSETALK_ROUTING_SECRET: the replicas share the one made in their avatar folder
        "MUSETALK_AVATAR_DIR": str(store), "MUSETALK_REPLICA_URL": f"http://127.0.0.1:{port}",
        "MUSETALK_DRAIN_SECONDS": str(DRAIN_S),
    }).start() for name, port in zip("ab", ports)]
    httpx.post(f"{started[0].url}/avatars", data={"avatar_id": "default"}, files={"file": ("a.png", face_png)},
               timeout=300).raise_for_status()
    with LocalBalancer([f"127.0.0.1:{port}" for port in ports], folder=BUILD / "balancer") as balancer:
        yield started, balancer
    for replica in started:
        replica.stop()


DRAIN_S = 8


def holder(replicas, session_id: str):
    """The replica that holds a session (by its own list)."""
    return next(r for r in replicas
                if session_id in [s["id"] for s in httpx.get(f"{r.url}/sessions").json()["sessions"]])


def test_every_replica_reaches_every_session_without_a_cookie(routed):
    """A session opened on one replica answers on the other one too (its id says where it lives):
    its status, a WHEP viewer, its speech socket and its DELETE, none of them carrying a cookie;
    an id whose signature is wrong is refused, not forwarded."""
    replicas, balancer = routed

    async def scenario():
        async with await AvatarSession.open(replicas[0].url, fps=12) as session:
            assert holder(replicas, session.id) is replicas[0]
            other = replicas[1].url
            through_other = AvatarSession(other, session.info, httpx.AsyncClient(base_url=other), {}, follow=False)
            statuses = [(await through_other.http.get(f"/sessions/{session.id}")).status_code for _ in range(2)]
            viewer = await through_other.watch()
            frames = [await asyncio.wait_for(viewer.video.get(), 20) for _ in range(5)]
            speech = await through_other.speech(16000)
            pcm = np.zeros(8000, "<i2").tobytes() + (np.sin(np.arange(16000) / 8) * 8000).astype("<i2").tobytes()
            await speech.send(pcm)
            await speech.end_segment()
            finished = await speech.event("speech_finished", timeout=60)
            async with httpx.AsyncClient(base_url=balancer.url) as http:  # round robin: lands on both
                spread = [(await http.get(f"/sessions/{session.id}")).status_code for _ in range(4)]
            await viewer.close()
            await speech.close()
            await through_other.http.aclose()
            return session.id, statuses, frames, finished, spread

    session_id, statuses, frames, finished, spread = asyncio.run(scenario())
    assert statuses == [200, 200] and spread == [200] * 4
    assert all(r.frame is not None for r in frames)
    assert finished["type"] == "speech_finished" and finished["interrupted"] is False
    assert httpx.get(f"{replicas[1].url}/sessions/{session_id}").status_code == 404  # and it ended
    token, address, _ = session_id.split(".")
    forged = f"{token}.{address}.AAAAAAAAAAAAAAAA"
    answer = httpx.get(f"{replicas[1].url}/sessions/{forged}")
    assert answer.status_code == 404 and "unknown session" in answer.json()["error"]


def test_a_draining_replica_tells_its_sessions_and_the_sdk_moves_them(routed):
    """SIGTERM to the replica that holds a session: new sessions there get 503 + Retry-After, the
    speech socket hears going_away, and client.sessions opens a new session through the balancer
    (on the other replica) and moves there, its viewer's frames going on; the replica exits once
    its sessions are gone."""
    replicas, balancer = routed

    async def scenario():
        session = await AvatarSession.open(balancer.url, fps=12)
        viewer = await session.watch()
        speech = await session.speech(16000)
        await asyncio.wait_for(viewer.video.get(), 20)
        draining = holder(replicas, session.id)
        first_id = session.id
        signalled = time.monotonic()
        draining.process.send_signal(signal.SIGTERM)
        going = await speech.event("going_away", timeout=10)
        refused = httpx.post(f"{draining.url}/sessions", json={"fps": 12})
        moved = await speech.event("session_moved", timeout=30)
        while viewer.video.qsize():
            viewer.video.get_nowait()
        resumed = await asyncio.wait_for(viewer.video.get(), 20)
        await speech.send((np.sin(np.arange(16000) / 8) * 8000).astype("<i2").tobytes())
        await speech.end_segment()
        spoke = await speech.event("speech_finished", timeout=60)
        await session.close()
        return draining, first_id, session.id, going, refused, moved, resumed.arrived - signalled, spoke

    draining, first_id, moved_id, going, refused, moved, resumed_after, spoke = asyncio.run(scenario())
    assert 0 < going["seconds_left"] <= DRAIN_S
    assert refused.status_code == 503 and int(refused.headers["Retry-After"]) >= 1, refused.text
    assert moved["from"] == first_id and moved["to"] == moved_id != first_id
    assert resumed_after < DRAIN_S  # frames of the new session before the old replica would have cut it
    assert spoke["interrupted"] is False
    assert draining.process.wait(DRAIN_S + 20) is not None  # it exits once its sessions have moved
