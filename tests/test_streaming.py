"""POST /onnx-infer with stream=true: fragmented MP4 while the frames are made (a real uvicorn
process, the real local Triton, real speech, the mp4 decoded)."""
from __future__ import annotations

import io
import math
import time
from contextlib import contextmanager

import av
import httpx
import pytest

from client import MuseTalkClient
from frontend.video import fmp4
from stack.frontend_process import FrontEnd
from support import BUILD, SPEECH, speech_seconds
from triton_local.processes import free_port
from triton_local.server import LocalTriton, Ports


def boxes(data: bytes) -> list[str]:
    out, offset = [], 0
    while offset + 8 <= len(data):
        size = int.from_bytes(data[offset : offset + 4], "big")
        out.append(data[offset + 4 : offset + 8].decode("latin-1"))
        offset += max(size, 8)
    return out


def video_facts(data: bytes) -> dict:
    with av.open(io.BytesIO(data)) as container:
        frames = sum(1 for _ in container.decode(video=0))
        stream = container.streams.video[0]
        audio = container.streams.audio[0]
        return {"frames": frames, "fps": float(stream.average_rate), "codec": stream.codec_context.name,
                "width": stream.codec_context.width, "audio": audio.codec_context.name}


def long_speech(times: int) -> bytes:
    """The speech fixture said `times` times over, as one FLAC."""
    import numpy as np
    import soundfile

    samples, rate = soundfile.read(str(SPEECH), dtype="float32")
    buffer = io.BytesIO()
    soundfile.write(buffer, np.tile(samples, times), rate, format="FLAC")
    return buffer.getvalue()


@contextmanager
def post_stream(url: str, speech: bytes, **form):
    """The streamed answer, its body read as it arrives; closing it drops the connection."""
    with httpx.Client(timeout=300) as client, client.stream(
            "POST", f"{url}/onnx-infer", data={"stream": "true", **form},
            files={"audio_file": ("speech.flac", speech)}) as response:
        yield response


def decoded_frames(triton) -> int:
    with MuseTalkClient(triton.grpc_url) as client:
        return int(client.statistics("vae_decoder").get("inference_count", 0))


def test_streamed_answer_is_a_fragmented_mp4_with_every_frame(frontend_server, speech_bytes):
    expected = math.floor(speech_seconds() * 25)
    with post_stream(frontend_server.url, speech_bytes) as response:
        assert response.status_code == 200
        assert response.headers["content-type"] == "video/mp4"
        assert response.headers["transfer-encoding"] == "chunked"
        assert int(response.headers["x-frame-count"]) == expected
        chunks = list(response.iter_raw())
    data = b"".join(chunks)
    assert len(chunks) > 3  # one fragment per batch, sent as made
    assert boxes(chunks[0])[:3] == ["ftyp", "moov", "moof"]  # the init segment, then the first frame
    assert fmp4.read_trailer(data)["status"] == "done" and fmp4.read_trailer(data)["frames"] == expected
    facts = video_facts(data)
    assert facts == {"frames": expected, "fps": 25.0, "codec": "h264", "width": 512, "audio": "aac"}
    whole = httpx.post(f"{frontend_server.url}/onnx-infer", files={"audio_file": ("s.flac", speech_bytes)},
                       timeout=300)
    assert video_facts(whole.content)["frames"] == expected  # the same frames as the whole answer


def test_first_fragment_leaves_before_the_clip_is_generated(frontend_server, triton, speech_bytes):
    """Causal, not timed: when the first fragment arrives, Triton has decoded only a few faces."""
    expected = math.floor(speech_seconds() * 25)
    before = decoded_frames(triton)
    with post_stream(frontend_server.url, speech_bytes) as response:
        chunks = response.iter_raw()
        first = next(chunks)
        decoded_then = decoded_frames(triton) - before
        rest = b"".join(chunks)
    assert "moof" in boxes(first)
    assert 1 <= decoded_then < expected / 2, f"{decoded_then} of {expected} faces decoded before the first byte"
    assert fmp4.read_trailer(first + rest)["frames"] == expected


@pytest.mark.parametrize("form, status, message", [
    ({"avatar_id": "nobody"}, 404, "unknown avatar"),
    ({"fps": "0"}, 422, "fps"),
])
def test_errors_before_the_first_byte_are_json(frontend_server, speech_bytes, form, status, message):
    with post_stream(frontend_server.url, speech_bytes, **form) as response:
        response.read()
    assert response.status_code == status and message in response.json()["error"]
    with post_stream(frontend_server.url, b"not audio at all" * 100) as bad:
        bad.read()
    assert bad.status_code == 422 and "cannot decode" in bad.json()["error"]


def test_an_error_mid_stream_ends_it_with_an_error_trailer(triton, frontend_server, speech_bytes):
    """Triton goes away while the stream is sent: the body is still a playable mp4 of the frames
    made, ends with an error trailer, and the front end serves on."""
    ports = Ports.free()
    server = LocalTriton(triton.repository, ports, log_file=BUILD / "triton-mid-stream.log").start()
    frontend = FrontEnd(server.grpc_url, free_port(), host="127.0.0.1", log_file=BUILD / "frontend-mid-stream.log",
                        env={"MUSETALK_AVATAR_DIR": _avatar_dir(frontend_server), "MUSETALK_BATCH_SIZE": "4",
                             "MUSETALK_DEFAULT_AVATAR": "default"}).start()
    try:
        with post_stream(frontend.url, long_speech(4)) as response:
            chunks = response.iter_raw()
            data = next(chunks)
            server.stop()  # mid-stream
            data += b"".join(chunks)
        trailer = fmp4.read_trailer(data)
        assert trailer["status"] == "error" and trailer["error"].startswith("musetalk: ")  # the failed model
        assert 1 <= trailer["frames"] < trailer["frames_expected"]
        assert video_facts(data)["frames"] == trailer["frames"]
        assert httpx.get(f"{frontend.url}/healthz").json() == {"status": "ok"}
    finally:
        frontend.stop()
        server.stop()


def test_a_client_that_leaves_mid_stream_stops_the_generation(frontend_server, triton, speech_bytes):
    frames = math.floor(6 * speech_seconds() * 25)
    before = decoded_frames(triton)
    with post_stream(frontend_server.url, long_speech(6)) as response:
        next(response.iter_raw())
    # The server notices, cancels its requests on Triton, and stops generating.
    time.sleep(3)
    settled = decoded_frames(triton)
    time.sleep(2)
    assert decoded_frames(triton) == settled, "generation went on for a client that had left"
    assert settled - before < frames / 2, "the clip was mostly generated: the test proves nothing"
    assert "musetalk_streams_active 0.0" in httpx.get(f"{frontend_server.url}/metrics").text
    again = httpx.post(f"{frontend_server.url}/onnx-infer", data={"skip_save_images": "true"},
                       files={"audio_file": ("s.flac", speech_bytes)}, timeout=300)
    assert again.status_code == 200


def _avatar_dir(frontend_server) -> str:
    return frontend_server.env["MUSETALK_AVATAR_DIR"]
