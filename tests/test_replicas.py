"""Stateless front ends: two replicas (two uvicorn processes) on one Triton and one shared avatar
folder, as two pods on a ReadWriteMany volume; and the metrics they serve."""
from __future__ import annotations

import io
import math
from concurrent.futures import ThreadPoolExecutor

import av
import httpx
import pytest

from stack.frontend_process import FrontEnd
from support import BUILD, speech_seconds
from triton_local.server import free_port


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
