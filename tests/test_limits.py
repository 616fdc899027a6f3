"""Load and hostile input, against a real uvicorn process with tight limits and the real local
Triton: admission control (429 + Retry-After, counted in /metrics), probes that answer under load,
bodies held to the limit while they stream, WebSocket limits and their close codes, back-pressure,
audio checked before it is decoded."""
from __future__ import annotations

import io
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest
import soundfile
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from stack.frontend_process import FrontEnd
from support import BUILD
from triton_local.processes import free_port

LIMITS = {
    "MUSETALK_MAX_UPLOAD_MB": "2",
    "MUSETALK_MAX_FRAMES_IN_PROGRESS": "100",  # under one clip of the fixture (138 frames at 25 fps)
    "MUSETALK_ADMISSION_QUEUE": "1",
    "MUSETALK_ADMISSION_WAIT_SECONDS": "1",
    "MUSETALK_MAX_PREPARATIONS": "1",
    "MUSETALK_MAX_LIVE_SESSIONS": "1",
    "MUSETALK_MAX_LIVE_SECONDS": "3",
    "MUSETALK_LIVE_IDLE_SECONDS": "2",
    "MUSETALK_BATCH_SIZE": "8",
}


@pytest.fixture(scope="module")
def tight(triton, tmp_path_factory, face_png):
    """A front end with small limits, its default avatar prepared from the astronaut photograph."""
    folder = tmp_path_factory.mktemp("tight")
    photo = folder / "astronaut.png"
    photo.write_bytes(face_png)
    server = FrontEnd(triton.grpc_url, free_port(), log_file=BUILD / "frontend-tight.log", host="127.0.0.1", env={
        "MUSETALK_AVATAR_DIR": str(folder / "avatars"), "MUSETALK_DEFAULT_AVATAR_SOURCE": str(photo), **LIMITS,
    }).start()
    assert server.wait_until_ready(180), f"the front end never became ready; see {server.log_file}"
    yield server
    server.stop()


def metric(url: str, name: str, **labels) -> float:
    wanted = ",".join(f'{k}="{v}"' for k, v in labels.items())
    line = f"{name}{{{wanted}}}" if labels else name
    text = httpx.get(f"{url}/metrics").text
    return sum(float(row.rsplit(" ", 1)[1]) for row in text.splitlines() if row.startswith(line + " "))


def generate(url: str, speech: bytes) -> httpx.Response:
    return httpx.post(f"{url}/onnx-infer", data={"skip_save_images": "true"},
                      files={"audio_file": ("speech.flac", speech)}, timeout=300)


def test_generations_beyond_capacity_wait_briefly_then_get_429_with_retry_after(tight, speech_bytes):
    refused = metric(tight.url, "musetalk_admissions_total", kind="generation", result="refused")
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda _: generate(tight.url, speech_bytes), range(4)))
    statuses = sorted(a.status_code for a in answers)
    assert statuses[0] == 200 and statuses.count(429) >= 2, statuses  # one runs, one may wait, the rest go
    for answer in answers:
        if answer.status_code == 429:
            assert "at capacity" in answer.json()["error"]
            assert int(answer.headers["Retry-After"]) >= 1
    assert metric(tight.url, "musetalk_admissions_total", kind="generation", result="refused") >= refused + 2
    assert metric(tight.url, "musetalk_admission_in_use", kind="generation") == 0  # all given back
    assert generate(tight.url, speech_bytes).status_code == 200  # and admitted again


def test_liveness_and_readiness_answer_at_once_under_load(tight, speech_bytes):
    stop = threading.Event()
    generations = []  # seconds each admitted generation took, in this same run

    def load():
        while not stop.is_set():
            started = time.monotonic()
            if generate(tight.url, speech_bytes).status_code == 200:
                generations.append(time.monotonic() - started)

    with ThreadPoolExecutor(4) as pool:
        for _ in range(4):
            pool.submit(load)
        time.sleep(1.0)
        slowest = 0.0
        try:
            for _ in range(20):
                for path in ("/healthz", "/readyz"):
                    started = time.monotonic()
                    assert httpx.get(f"{tight.url}{path}", timeout=5).status_code == 200
                    slowest = max(slowest, time.monotonic() - started)
                time.sleep(0.1)
        finally:
            stop.set()
    # A probe answers from the event loop (5-40 ms under this load on 2 cores, 0.73 s once on a
    # machine busy with more); one that queued behind a generation would take a generation's time.
    # The bound is that relation, measured in the same run: a quarter of the quickest generation.
    assert generations, "no generation was admitted during the load"
    assert slowest < min(generations) / 4, \
        f"a probe took {slowest:.2f} s under load; the quickest generation {min(generations):.2f} s"


def test_a_chunked_body_ten_times_the_limit_is_refused_while_it_streams(tight):
    sent = [0]

    def body():  # no Content-Length: chunked, a 50 MB file against a 2 MB limit
        yield (b'--x\r\nContent-Disposition: form-data; name="audio_file"; filename="big.flac"\r\n'
               b"Content-Type: application/octet-stream\r\n\r\n")
        for _ in range(50):
            sent[0] += 1
            yield b"\0" * 2**20
        yield b"\r\n--x--\r\n"

    try:
        answer = httpx.post(f"{tight.url}/onnx-infer", content=body(), timeout=60,
                            headers={"Content-Type": "multipart/form-data; boundary=x"})
        assert answer.status_code == 413 and "limit" in answer.json()["error"]
    except (httpx.WriteError, httpx.RemoteProtocolError):
        pass  # the server answered and closed while the client was still sending
    # The server stopped reading at the limit and closed: the client could send the limit and
    # what the sockets' buffers held, not the 50 MB.
    assert sent[0] <= 15, f"{sent[0]} MB were sent before the server refused"
    assert httpx.get(f"{tight.url}/healthz").status_code == 200


def test_a_declared_length_over_the_limit_is_refused_before_it_is_read(tight):
    answer = httpx.post(f"{tight.url}/onnx-infer", files={"audio_file": ("big.flac", b"\0" * (3 * 2**20))})
    assert answer.status_code == 413 and "the limit is 2 MB" in answer.json()["error"]


def test_preparations_beyond_the_limit_get_429_with_retry_after(tight):
    from support import face_on_canvas, video_bytes

    clip = video_bytes([face_on_canvas(640, 480, 120, shift=i % 8)[0] for i in range(60)])
    first = httpx.post(f"{tight.url}/avatars", data={"avatar_id": "slow"}, files={"file": ("a.mp4", clip)},
                       timeout=60)
    try:
        assert first.status_code in (201, 202)
        if first.status_code == 202:
            second = httpx.post(f"{tight.url}/avatars", data={"avatar_id": "other"},
                                files={"file": ("b.mp4", clip)}, timeout=60)
            assert second.status_code == 429 and "avatar preparations" in second.json()["error"]
            assert int(second.headers["Retry-After"]) >= 1
    finally:
        httpx.delete(f"{tight.url}/avatars/slow")


def live(url: str, **query) -> str:
    return f"{url.replace('http', 'ws')}/ws/live?" + "&".join(f"{k}={v}" for k, v in query.items())


def closed_with(socket) -> tuple[list[dict], int]:
    messages = []
    with pytest.raises(ConnectionClosed) as closed:
        while True:
            message = socket.recv(timeout=30)
            if isinstance(message, str):
                messages.append(json.loads(message))
    return messages, closed.value.rcvd.code


@pytest.mark.parametrize("query, code, message", [
    ({"fps": "abc"}, 4422, "fps must be 1..60"),
    ({"sample_rate": "16k"}, 4422, "sample_rate must be"),
])
def test_malformed_parameters_are_an_error_and_4422_not_a_403(tight, query, code, message):
    with connect(live(tight.url, **query)) as socket:
        messages, closed = closed_with(socket)
    assert message in messages[-1]["error"] and closed == code


def test_live_sessions_are_held_to_their_limits(tight):
    second = np.zeros(16000, "<i2").tobytes()
    with connect(live(tight.url)) as socket:  # MUSETALK_MAX_LIVE_SECONDS=3
        socket.recv()
        for _ in range(4):
            socket.send(second)
        messages, closed = closed_with(socket)
    assert closed == 4413 and "at most 3 s" in messages[-1]["error"]
    with connect(live(tight.url)) as socket:
        socket.recv()
        socket.send(b"\0" * (2**20 + 2))  # over 1 MiB in one message
        messages, closed = closed_with(socket)
    assert closed == 4413 and "at most 1024 kB" in messages[-1]["error"]
    with connect(live(tight.url)) as socket:  # MUSETALK_LIVE_IDLE_SECONDS=2: a client that goes quiet
        socket.recv()
        socket.send(second[:3200])
        messages, closed = closed_with(socket)
    assert closed == 4408 and "nothing received" in messages[-1]["error"]
    with connect(live(tight.url)) as first, connect(live(tight.url)) as other:  # one slot
        assert json.loads(first.recv())["type"] == "start"
        messages, closed = closed_with(other)
    assert closed == 4429 and "live sessions are taken" in messages[-1]["error"]


def test_a_live_session_whose_triton_is_away_closes_with_4503(tight, tmp_path):
    away = FrontEnd(f"127.0.0.1:{free_port()}", free_port(), log_file=BUILD / "frontend-no-triton.log",
                    host="127.0.0.1", env={**LIMITS, "MUSETALK_AVATAR_DIR": tight.env["MUSETALK_AVATAR_DIR"]}).start()
    try:
        with connect(live(away.url)) as socket:
            assert json.loads(socket.recv())["type"] == "start"
            socket.send(np.zeros(16000, "<i2").tobytes())
            socket.send(json.dumps({"type": "end"}))
            messages, closed = closed_with(socket)
        assert closed == 4503 and "inference server unavailable" in messages[-1]["error"]
    finally:
        away.stop()


def test_a_live_client_that_sends_fast_and_never_reads_does_not_grow_the_server(frontend_server):
    """500 s of (incompressible) audio sent as fast as possible, nothing read: the server stops
    reading once the session trails by MUSETALK_MAX_LIVE_LAG_SECONDS or its inbox holds 2 s
    (TCP pushes back), so it reads only as fast as it makes video, and holds no more than that.

    What the client managed to send says nothing of the server: the kernel's buffers take it
    (Linux grows a socket's receive buffer up to tcp_rmem's maximum, 32 MB on some machines:
    over 1000 s of this audio). What the server read is its own count
    (musetalk_live_audio_seconds_total): the lag bound (10 s) and the inbox (2 s), plus what the
    session made into video in these 15 s (about 15 s of audio on 2 cores with the tiny models);
    120 s leaves room for a machine several times faster."""
    process = psutil.Process(frontend_server.process.pid)
    noise = np.random.default_rng(0).integers(-3000, 3000, 16000 * 2).astype("<i2").tobytes()  # 2 s
    sent = [0]

    def flood(socket):
        try:
            for _ in range(250):
                socket.send(noise)
                sent[0] += 1
        except Exception:  # noqa: BLE001 - closed when the test ends
            pass

    with connect(live(frontend_server.url)) as socket:  # a first, whole session: libraries loaded
        socket.recv()
        socket.send(noise[:16000])
        socket.send(json.dumps({"type": "end"}))
        assert closed_with(socket)[1] == 1000
    read_before = metric(frontend_server.url, "musetalk_live_audio_seconds_total")
    with connect(live(frontend_server.url)) as socket:
        socket.recv()
        threading.Thread(target=flood, args=(socket,), daemon=True).start()
        # Once the session stops reading (its lag bound, a few seconds in), what it holds is
        # bounded: the second 5 s window is measured, the first holds the session's own start
        # (encoders, buffers of its first frames).
        time.sleep(10)
        early = process.memory_info().rss
        time.sleep(5)
        grown = process.memory_info().rss - early
        read = metric(frontend_server.url, "musetalk_live_audio_seconds_total") - read_before
        # The flood's send is blocked (the server reads nothing), and so would a close be: the
        # connection is cut, as a client that goes away does.
        socket.socket.shutdown(__import__("socket").SHUT_RDWR)
    assert read < 120, f"the server read {read:.0f} s of audio from a client that reads nothing"
    # Memory: the session goes on at its generation's pace while the client's kernel takes the
    # video (its receive buffer grows to megabytes), so the allocator swings by tens of MB in 5 s
    # here; what the bound prevents is the read above (all 500 s, and everything made of them).
    assert grown < 100e6, f"the front end kept growing: {grown / 1e6:.0f} MB in 5 s"
    assert httpx.get(f"{frontend_server.url}/healthz").status_code == 200


def flac_of_silence(seconds: float, channels: int, rate: int = 48000) -> bytes:
    buffer = io.BytesIO()
    with soundfile.SoundFile(buffer, "w", rate, channels, format="FLAC") as out:
        block = np.zeros((rate * 10, channels), np.int16)
        for _ in range(int(seconds // 10)):
            out.write(block)
    return buffer.getvalue()


def peak_rss_reset(pid: int) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # restart the peak (VmHWM) from now


def peak_rss(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM"))) * 1024


@pytest.mark.parametrize("seconds, channels, rate", [(1200, 2, 48000), (3600, 8, 8000)])
def test_long_audio_is_refused_before_it_is_decoded(frontend_server, seconds, channels, rate):
    data = flac_of_silence(seconds, channels, rate)
    assert len(data) < 5e6  # a few MB of FLAC: hours of silence
    pid = frontend_server.process.pid
    current = psutil.Process(pid).memory_info().rss
    peak_rss_reset(pid)
    answer = httpx.post(f"{frontend_server.url}/onnx-infer", files={"audio_file": ("long.flac", data)}, timeout=60)
    assert answer.status_code == 422 and f"lasts {seconds:.1f} s" in answer.json()["error"]
    assert peak_rss(pid) - current < 60e6, f"the front end's memory peaked {(peak_rss(pid) - current) / 1e6:.0f} MB up"


def test_work_longer_than_the_time_limit_is_refused_at_once_with_the_estimate(tight, triton, speech_bytes):
    """A front end with MUSETALK_MAX_REQUEST_SECONDS (and the tight one's avatars): it learns
    the server's pace from a first frame before it is ready, then refuses a clip that pace says
    would take three times the limit, at once (503 + Retry-After, the estimate in the body), and
    serves one that takes a third of it. The lengths follow from the pace measured here, so
    the test holds on a fast machine and a slow one alike."""
    limit = 3.0
    folder = tight.env["MUSETALK_AVATAR_DIR"]
    server = FrontEnd(triton.grpc_url, free_port(), log_file=BUILD / "frontend-timed.log", host="127.0.0.1", env={
        "MUSETALK_AVATAR_DIR": folder, "MUSETALK_MAX_REQUEST_SECONDS": str(limit), "MUSETALK_BATCH_SIZE": "8",
    }).start()
    try:
        assert server.wait_until_ready(120), f"never ready; see {server.log_file}"
        pace = httpx.get(f"{server.url}/info").json()["seconds_per_frame"]
        assert pace and pace > 0
        fps = 25
        samples, rate = soundfile.read(io.BytesIO(speech_bytes), dtype="float32")

        def clip(frames: int) -> bytes:
            out = io.BytesIO()
            seconds = frames / fps
            repeated = np.tile(samples, int(np.ceil(seconds * rate / len(samples))))[: int(seconds * rate) + 1]
            soundfile.write(out, repeated, rate, format="FLAC")
            return out.getvalue()

        too_long = max(2, int(np.ceil(3 * limit / pace)))
        started = time.monotonic()
        refused = httpx.post(f"{server.url}/onnx-infer", data={"skip_save_images": "true", "fps": str(fps)},
                             files={"audio_file": ("long.flac", clip(too_long))}, timeout=300)
        assert refused.status_code == 503, refused.text
        assert time.monotonic() - started < limit  # refused, not tried
        body = refused.json()
        assert "MUSETALK_MAX_REQUEST_SECONDS" in body["error"] and body["limit_seconds"] == limit
        assert body["estimated_seconds"] >= 2 * limit and int(refused.headers["Retry-After"]) >= 1
        short = max(1, int(limit / pace / 3))
        served = httpx.post(f"{server.url}/onnx-infer", data={"skip_save_images": "true", "fps": str(fps)},
                            files={"audio_file": ("short.flac", clip(short))}, timeout=300)
        assert served.status_code == 200, served.text
        assert metric(server.url, "musetalk_admissions_total", kind="generation", result="too_long") == 1
    finally:
        server.stop()
