"""Live sessions: WebSocket /ws/live against a real uvicorn process and the real local Triton,
and the incremental audio windows against the whole-clip path's."""
from __future__ import annotations

import io
import json
import math
import threading
from concurrent.futures import ThreadPoolExecutor

import av
import httpx
import numpy as np
import pytest
import soundfile
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from client import MuseTalkClient
from contract.layout import model_path
from contract.runners import open_runner
from frontend.speech import audio
from frontend.speech.incremental import IncrementalFeatures
from frontend.video import fmp4
from support import SPEECH, eventually, settled_count, speech_seconds


def pcm(rate: int | None = None) -> tuple[bytes, int]:
    """The speech fixture as 16-bit PCM, at its own rate or resampled."""
    samples, native = soundfile.read(str(SPEECH), dtype="float32")
    if rate and rate != native:
        import soxr

        samples, native = soxr.resample(samples, native, rate), rate
    return (np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes(), native


def live_session(url: str, data: bytes, rate: int, chunk_s: float = 0.04, fps: int = 25, **query) -> dict:
    """Send `data` in chunks, then end; collect what comes back."""
    params = "&".join(f"{k}={v}" for k, v in {"fps": fps, "sample_rate": rate, **query}.items())
    out = {"messages": [], "video": bytearray()}
    with connect(f"{url.replace('http', 'ws')}/ws/live?{params}", max_size=None, open_timeout=30) as ws:
        out["start"] = json.loads(ws.recv())
        step = int(rate * chunk_s) * 2
        for offset in range(0, len(data), step):
            ws.send(data[offset : offset + step])
        ws.send(json.dumps({"type": "end"}))
        for message in ws:
            if isinstance(message, bytes):
                out["video"] += message
            else:
                out["messages"].append(json.loads(message))
    return out


def frames_in(video: bytes) -> int:
    with av.open(io.BytesIO(bytes(video))) as container:
        return sum(1 for _ in container.decode(video=0))


@pytest.mark.parametrize("rate", [16000, 22050, 48000])
def test_live_speech_becomes_a_fragmented_mp4_of_every_frame(frontend_server, rate):
    data, rate = pcm(rate)
    result = live_session(frontend_server.url, data, rate)
    expected = math.floor(len(data) / 2 / rate * 25)
    start, done = result["start"], result["messages"][-1]
    assert start["type"] == "start" and start["codecs"].startswith("avc1.") and start["width"] == 512
    assert done["type"] == "done" and done["frames"] == expected
    assert done["latency_ms"]["p50"] > 0 and done["encoder_runs"] >= 1
    assert fmp4.read_trailer(bytes(result["video"]))["status"] == "done"
    assert frames_in(result["video"]) == expected
    progress = [m for m in result["messages"] if m["type"] == "progress"]
    assert all({"frames", "audio_seconds", "lag_seconds", "latency_ms"} <= set(m) for m in progress)


@pytest.mark.parametrize("query, code, message", [
    ({"fps": 0}, 4422, "fps"),
    ({"sample_rate": 100}, 4422, "sample_rate"),
    ({"avatar_id": "nobody"}, 4404, "unknown avatar"),
    ({"avatar_id": "../etc"}, 4422, "invalid avatar id"),
])
def test_bad_parameters_are_an_error_message_and_a_4000_code(frontend_server, query, code, message):
    params = "&".join(f"{k}={v}" for k, v in query.items())
    with connect(f"{frontend_server.url.replace('http', 'ws')}/ws/live?{params}") as ws:
        error = json.loads(ws.recv())
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv()
    assert error["type"] == "error" and message in error["error"]
    assert closed.value.rcvd.code == code


def test_a_bad_message_ends_the_session_with_4422(frontend_server):
    with connect(f"{frontend_server.url.replace('http', 'ws')}/ws/live") as ws:
        assert json.loads(ws.recv())["type"] == "start"
        ws.send("hello")
        messages = []
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                message = ws.recv()
                if isinstance(message, str):
                    messages.append(json.loads(message))
    assert messages[-1]["type"] == "error" and "expected binary PCM" in messages[-1]["error"]
    assert closed.value.rcvd.code == 4422


def live_sessions_open(url: str) -> float:
    text = httpx.get(f"{url}/metrics").text
    return float(next(line.split()[1] for line in text.splitlines() if line.startswith("musetalk_live_sessions ")))


def test_clients_that_leave_mid_session_free_their_slot(frontend_server, triton):
    """The front end allows 4 sessions: 6 clients that leave mid-session, one after the
    other, each free their slot (their Triton calls cancelled); then a whole session works."""
    data, rate = pcm(16000)
    url = f"{frontend_server.url.replace('http', 'ws')}/ws/live?sample_rate={rate}"
    before = settled_count(triton.grpc_url, "vae_decoder")
    for _ in range(6):
        with connect(url) as ws:  # closed on leaving the block: mid-session, frames in flight
            assert json.loads(ws.recv())["type"] == "start"
            ws.send(data[: len(data) // 2])
        eventually(lambda: live_sessions_open(frontend_server.url), lambda n: n == 0, 30,
                   what="no live session open once its client left")
    # and nothing of theirs runs on Triton any more: most of the frames of what they sent never ran
    sent_frames = 6 * math.floor(len(data) // 2 / 2 / rate * 25)
    assert settled_count(triton.grpc_url, "vae_decoder") - before < sent_frames / 2
    result = live_session(frontend_server.url, data, rate)
    assert result["messages"][-1]["type"] == "done"
    assert live_sessions_open(frontend_server.url) == 0
    assert "musetalk_live_latency_seconds_count" in httpx.get(f"{frontend_server.url}/metrics").text


def test_several_sessions_share_triton_and_its_batcher(frontend_server, triton):
    data, rate = pcm(16000)
    expected = math.floor(len(data) / 2 / rate * 12)
    with MuseTalkClient(triton.grpc_url) as client:
        before = client.statistics("unet")
        with ThreadPoolExecutor(3) as pool:
            results = list(pool.map(lambda _: live_session(frontend_server.url, data, rate, fps=12), range(3)))
        after = client.statistics("unet")
    assert [r["messages"][-1]["frames"] for r in results] == [expected] * 3
    inferences = int(after["inference_count"]) - int(before.get("inference_count", 0))
    executions = int(after["execution_count"]) - int(before.get("execution_count", 0))
    assert inferences == 3 * expected and executions < inferences


# -- the incremental windows ---------------------------------------------------------------
@pytest.fixture(scope="module")
def encoder(tiny_onnx):
    run = open_runner(model_path(tiny_onnx, "audio_encoder"))
    lock = threading.Lock()

    def encode(mel):
        with lock:
            return run({"input_features": mel})["hidden_states"]

    return encode


def incremental(encoder, samples: np.ndarray, fps: int, chunk: int, **options):
    features = IncrementalFeatures(fps, **options)
    windows, kept = [], []

    def pump():
        while features.due():
            covers, mel = features.run_input()
            features.accept(covers, encoder(mel))
            windows.append(features.windows()[1])
            kept.append(len(features.final))

    for start in range(0, len(samples), chunk):
        features.add(samples[start : start + chunk])
        pump()
    features.end()
    pump()
    windows.append(features.windows()[1])
    assert features.done
    return np.concatenate(windows), features, kept


@pytest.fixture(scope="module")
def long_speech():
    speech = audio.decode(SPEECH.read_bytes())
    return np.tile(speech.samples_16k, 6)  # 33 s: crosses a 30 s segment boundary


def test_incremental_windows_equal_the_whole_clip_when_heard_at_once(encoder, long_speech):
    whole = audio.frame_windows(encoder(audio.mel_segments(long_speech)), len(long_speech) / 16000, 25)
    windows, features, _ = incremental(encoder, long_speech, 25, chunk=len(long_speech))
    assert features.runs == 2  # one per segment
    np.testing.assert_array_equal(windows, whole)


@pytest.mark.parametrize("fps", [30])  # 5/3 feature steps per frame (25 fps: the test above)
def test_incremental_windows_stay_close_with_bounded_cost_and_memory(encoder, long_speech, fps):
    seconds = len(long_speech) / 16000
    whole = audio.frame_windows(encoder(audio.mel_segments(long_speech)), seconds, fps)
    hop = 0.5  # fewer runs than a server's (HOP_S): the same logic, a tenth of the test's time
    windows, features, kept = incremental(encoder, long_speech, fps, chunk=640, hop_s=hop)
    assert windows.shape == whole.shape  # floor(seconds x fps) frames, none dropped
    rel_l2 = np.linalg.norm(windows - whole) / np.linalg.norm(whole)
    assert rel_l2 < 0.05, rel_l2  # measured 0.011 (benchmarks/results/live_features_tiny.md)
    assert rel_l2 > 0  # and not trivially: the runs really saw less audio than the whole clip
    assert features.runs <= seconds / hop + 3  # at most one run per hop, plus segment ends
    assert max(kept) <= 60  # only the steps the next frames need are kept (about 1 s)
    # The last frames, computed after the stream ended, are exactly the whole clip's.
    np.testing.assert_array_equal(windows[-3:], whole[-3:])


def test_fixture_length_is_read_from_the_file():
    assert abs(speech_seconds() - 5.5558) < 1e-3
