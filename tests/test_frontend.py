"""POST /onnx-infer end to end: real local Triton, a real photo, real speech, the real mp4."""
from __future__ import annotations

import io
import json
import math
from concurrent.futures import ThreadPoolExecutor

import av
import cv2
import numpy as np
import pytest
import skimage.data
from fastapi.testclient import TestClient

from client.readiness import wait_for
from frontend.app import create_app
from frontend.avatars.store import AvatarStore
from frontend.settings import Settings
from support import eventually, speech_seconds
from triton_local.server import LocalTriton, Ports

SPEECH_SECONDS = speech_seconds()


@pytest.fixture(scope="module")
def settings(triton, tmp_path_factory):
    return Settings(triton_url=triton.grpc_url, avatar_dir=tmp_path_factory.mktemp("avatars"),
                    max_audio_seconds=20, max_upload_mb=2, batch_size=8)


@pytest.fixture(scope="module")
def api(settings, face_png):
    with TestClient(create_app(settings)) as client:
        response = client.post("/avatars", data={"avatar_id": "astronaut"},
                               files={"file": ("astronaut.png", face_png, "image/png")})
        assert response.status_code == 201, response.text
        yield client


def post_speech(api, speech_bytes, name="speech.flac", **form):
    return api.post("/onnx-infer", data={"avatar_id": "astronaut", **form},
                    files={"audio_file": (name, speech_bytes)})


def decode_video(data: bytes):
    with av.open(io.BytesIO(data)) as container:
        video = container.streams.video[0]
        audio = container.streams.audio
        frames = [f.to_ndarray(format="bgr24") for f in container.decode(video=0)]
        info = {
            "fps": float(video.average_rate), "codec": video.codec_context.name,
            "pix_fmt": video.codec_context.format.name,
            "audio": [(a.codec_context.name, float(a.duration * a.time_base)) for a in audio],
            "duration": container.duration / 1e6,
        }
    return frames, info


@pytest.mark.parametrize("fps", [25, 12])
def test_speech_becomes_a_lip_synced_video(api, speech_bytes, face_image, fps):
    response = post_speech(api, speech_bytes, fps=str(fps))
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "video/mp4"
    expected = math.floor(SPEECH_SECONDS * fps)
    assert int(response.headers["x-frame-count"]) == expected
    timings = json.loads(response.headers["x-timings"])
    assert timings["frames"] == expected and timings["total"] > 0

    frames, info = decode_video(response.content)
    assert len(frames) == expected  # floor(seconds * fps): no frame dropped
    assert info["codec"] == "h264" and info["pix_fmt"] == "yuv420p"
    assert info["fps"] == fps
    assert info["audio"] and info["audio"][0][0] == "aac"
    assert abs(info["audio"][0][1] - SPEECH_SECONDS) < 0.1
    assert abs(info["duration"] - SPEECH_SECONDS) < 0.1

    # Outside the face box every pixel is the avatar's own (up to H.264's loss);
    # inside its lower half the generated face was blended in.
    box = api.app.state.services.store.load("astronaut").boxes[0]
    outside = np.ones(face_image.shape[:2], bool)
    outside[box.y1 : box.y2, box.x1 : box.x2] = False
    frame = frames[len(frames) // 2].astype(int)
    assert np.abs(frame - face_image)[outside].mean() < 3
    mouth = (slice(box.y1 + box.height * 3 // 4, box.y2 - 12), slice(box.x1 + box.width // 3, box.x2 - box.width // 3))
    assert np.abs(frame[mouth] - face_image[mouth]).mean() > 10


def test_skip_save_images_answers_timings(api, speech_bytes):
    response = post_speech(api, speech_bytes, skip_save_images="true", fps="30")
    assert response.status_code == 200
    body = response.json()
    assert body["frames"] == math.floor(SPEECH_SECONDS * 30)
    assert body["encoding"] == 0 and body["frames_per_second"] > 0
    for stage in ("audio_features", "waiting_for_triton", "blending", "total"):
        assert stage in body


def test_concurrent_requests_all_succeed(api, speech_bytes):
    with ThreadPoolExecutor(3) as pool:
        responses = list(pool.map(lambda _: post_speech(api, speech_bytes, fps="12", skip_save_images="true"),
                                  range(3)))
    assert [r.status_code for r in responses] == [200, 200, 200]


def test_avatar_crud_and_restart_keeps_it(api, settings, face_png):
    listed = api.get("/avatars").json()
    assert "astronaut" in [a["id"] for a in listed["avatars"]]
    meta = api.get("/avatars/astronaut").json()
    assert meta["width"] == 512 and meta["frames"] == 1
    assert AvatarStore(settings.avatar_dir).load("astronaut").latents.shape == (1, 8, 32, 32)

    created = api.post("/avatars", data={"avatar_id": "temp"},
                       files={"file": ("a.png", face_png, "image/png")})
    assert created.status_code == 201
    duplicate = api.post("/avatars", data={"avatar_id": "temp"},
                         files={"file": ("a.png", face_png, "image/png")})
    assert duplicate.status_code == 409 and "already exists" in duplicate.json()["error"]
    assert api.delete("/avatars/temp").json() == {"deleted": "temp"}
    assert api.get("/avatars/temp").status_code == 404


def test_video_avatar_cycles_ping_pong(api, face_image, speech_bytes):
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = 512, 512, "yuv420p"
        for i in range(4):  # the astronaut drifting right by 2 px a frame
            frame = np.roll(face_image, 2 * i, axis=1)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="bgr24")):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    created = api.post("/avatars", data={"avatar_id": "drift"},
                       files={"file": ("drift.mp4", buffer.getvalue(), "video/mp4")})
    assert created.status_code == 201, created.text
    avatar = api.app.state.services.store.load("drift")
    assert avatar.frame_count == 4
    assert [avatar.cycle_index(i) for i in range(10)] == [0, 1, 2, 3, 3, 2, 1, 0, 0, 1]
    assert avatar.boxes[3].x1 > avatar.boxes[0].x1  # the box follows the face
    response = post_speech(api, speech_bytes, avatar_id="drift", skip_save_images="true")
    assert response.status_code == 200
    api.delete("/avatars/drift")


def assert_still_serving(api):
    assert api.get("/healthz").json() == {"status": "ok"}


def no_leftovers(settings) -> bool:
    """Nothing half-made in the store: no upload or staging folder left by a job (a failed job
    keeps only its job.json, to say why, for an hour), no trash."""
    store = settings.avatar_dir
    return not [*store.glob(".jobs/*/upload"), *store.glob(".jobs/*/staging"), *store.glob(".trash-*")]


@pytest.mark.parametrize("case, status, message", [
    ("empty", 422, "empty"),
    ("truncated", 422, "decode"),
    ("not audio", 422, "cannot decode"),
    ("too long", 422, "limit is 20 s"),
    ("too large", 413, "limit"),
    ("fps 0", 422, "fps"),
    ("fps 61", 422, "fps"),
    ("unknown avatar", 404, "unknown avatar"),
    ("path traversal", 422, "invalid avatar id"),
    ("batch 0", 422, "batch_size"),
])
def test_bad_requests_are_clear_json_errors(api, settings, speech_bytes, case, status, message):
    audio, form = speech_bytes, {}
    if case == "empty":
        audio = b""
    elif case == "truncated":
        audio = speech_bytes[:50]
    elif case == "not audio":
        audio = b"%PDF-1.4 definitely not speech" * 100
    elif case == "too long":
        audio = _long_wav(25)
    elif case == "too large":
        audio = b"\0" * (3 * 2**20)
    elif case.startswith("fps"):
        form["fps"] = case.split()[1]
    elif case == "unknown avatar":
        form["avatar_id"] = "nobody"
    elif case == "path traversal":
        form["avatar_id"] = "../../etc"
    elif case == "batch 0":
        form["batch_size"] = "0"
    response = post_speech(api, audio, **form)
    assert response.status_code == status, response.text
    assert message in response.json()["error"]
    assert no_leftovers(settings)
    assert_still_serving(api)


def _long_wav(seconds: int) -> bytes:
    import soundfile

    buffer = io.BytesIO()
    soundfile.write(buffer, np.zeros(8000 * seconds, np.float32), 8000, format="WAV")
    return buffer.getvalue()


@pytest.mark.parametrize("upload, avatar_id, status, message", [
    ("no face", "coffee", 422, "no face found in the image"),
    ("not media", "junk", 422, "cannot read the avatar file"),
    ("face", "../evil", 422, "invalid avatar id"),
    ("face", "has space", 422, "invalid avatar id"),
    ("face", "trailing\n", 422, "invalid avatar id"),
])
def test_bad_avatars_are_clear_json_errors(api, settings, face_png, speech_bytes,
                                           upload, avatar_id, status, message):
    data = {"no face": cv2.imencode(".png", skimage.data.coffee())[1].tobytes(),
            "not media": b"plain text, no pixels" * 50, "face": face_png}[upload]
    response = api.post("/avatars", data={"avatar_id": avatar_id}, files={"file": ("x", data)})
    assert response.status_code == status, response.text
    assert message in response.json()["error"]
    assert not (settings.avatar_dir / avatar_id).exists()  # for "../evil": nothing beside the store
    assert no_leftovers(settings)
    assert_still_serving(api)


def test_after_every_bad_request_a_good_one_still_works(api, speech_bytes):
    """(After the bad requests above, in this module's order: one generation proves the server
    whole, rather than one after each.)"""
    assert post_speech(api, speech_bytes, fps="12", skip_save_images="true").status_code == 200


def test_ids_with_a_trailing_newline_are_invalid_not_unknown(api):
    response = api.get("/avatars/abc%0A")
    assert response.status_code == 422 and "invalid avatar id" in response.json()["error"]


def test_video_without_faces_names_the_frames(api):
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = 400, 400, "yuv420p"
        for _ in range(3):
            frame = cv2.resize(cv2.cvtColor(skimage.data.coffee(), cv2.COLOR_RGB2BGR), (400, 400))
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="bgr24")):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    response = api.post("/avatars", data={"avatar_id": "cups"},
                        files={"file": ("cups.mp4", buffer.getvalue())})
    assert response.status_code == 422
    assert "no face found in 3 of 3 frames (frame 0, 1, 2)" in response.json()["error"]


def test_triton_down_is_503_and_recovers_without_restart(api, settings, speech_bytes, triton):
    ports = Ports.free()
    down = Settings(triton_url=f"localhost:{ports.grpc}", avatar_dir=settings.avatar_dir, default_avatar="astronaut")
    with TestClient(create_app(down)) as down_api:
        ready = readiness(down_api, lambda r: "not checked yet" not in r.text)
        assert ready.status_code == 503 and "not reachable" in ready.json()["error"]
        failed = post_speech(down_api, speech_bytes)
        assert failed.status_code == 503 and "unavailable" in failed.json()["error"]

        # The server comes up on the address the front end was given.
        with LocalTriton(triton.repository, ports, log_file=triton.log_file.with_name("triton-2.log")):
            assert readiness(down_api, lambda r: r.status_code == 200).status_code == 200
            assert post_speech(down_api, speech_bytes, skip_save_images="true").status_code == 200


def readiness(api, until, timeout: float = 10.0):
    """/readyz once `until(answer)` (it reports a check made every second in the background)."""
    return eventually(lambda: api.get("/readyz"), until, timeout, what="/readyz's answer")


def test_not_ready_while_the_default_request_would_fail_and_the_404_says_how_to_make_one(triton, tmp_path,
                                                                                         speech_bytes):
    """The default avatar is configured ("default", the setting's default) but there is none and no
    source to make it from: /readyz says so and how to fix it; a request that names no avatar hears
    how to make one."""
    settings = Settings(triton_url=triton.grpc_url, avatar_dir=tmp_path / "avatars")
    with TestClient(create_app(settings)) as api:
        answer = readiness(api, lambda r: "does not exist" in r.text, 60)
        assert answer.status_code == 503 and "MUSETALK_DEFAULT_AVATAR_SOURCE" in answer.json()["error"]
        refused = post_speech(api, speech_bytes, avatar_id="")
        assert refused.status_code == 404 and "POST /avatars" in refused.json()["error"]


def test_ready_only_once_the_default_avatar_is_prepared(triton, tmp_path, face_png, speech_bytes,
                                                        monkeypatch):
    """A client that waits for /readyz never gets "still being prepared"."""
    import threading

    from frontend.startup import DefaultAvatar

    looked = threading.Event()  # the preparation waits until the test has looked
    prepare_default = DefaultAvatar._prepare
    monkeypatch.setattr(DefaultAvatar, "_prepare",
                        lambda self, source: (looked.wait(60), prepare_default(self, source)))
    photo = tmp_path / "portrait.png"
    photo.write_bytes(face_png)
    settings = Settings(triton_url=triton.grpc_url, avatar_dir=tmp_path / "avatars",
                        default_avatar="house", default_avatar_source=str(photo))
    with TestClient(create_app(settings)) as api:
        not_yet = readiness(api, lambda r: "not checked yet" not in r.text)
        assert not_yet.status_code == 503 and "still being prepared" in not_yet.json()["error"]
        early = api.post("/onnx-infer", data={"skip_save_images": "true"},
                         files={"audio_file": ("speech.flac", speech_bytes)})
        assert early.status_code == 503 and "still being prepared" in early.json()["error"]
        looked.set()
        assert wait_for(lambda: api.get("/readyz").status_code == 200, 120, 0.2), "never ready"
        response = api.post("/onnx-infer", data={"skip_save_images": "true"},
                            files={"audio_file": ("speech.flac", speech_bytes)})
        assert response.status_code == 200 and response.json()["avatar_id"] == "house"


@pytest.mark.parametrize("source", ["missing file", "no face"])
def test_a_default_avatar_that_cannot_be_prepared_says_why(triton, tmp_path, speech_bytes, source):
    """Not "still being prepared" for ever: /readyz gives the reason, requests get a 404."""

    photo = tmp_path / "portrait.png"
    if source == "no face":
        cv2.imwrite(str(photo), np.full((256, 256, 3), 128, np.uint8))
    settings = Settings(triton_url=triton.grpc_url, avatar_dir=tmp_path / "avatars",
                        default_avatar="house", default_avatar_source=str(photo))
    with TestClient(create_app(settings)) as api:
        def waiting(answer: str) -> bool:
            return "still being prepared" in answer or "not checked yet" in answer

        ready = eventually(lambda: api.get("/readyz").json()["error"], lambda answer: not waiting(answer), 60, 0.2,
                           "the default avatar's verdict")  # one answer per turn
        assert "could not be prepared" in ready and ("portrait.png" in ready or "face" in ready)
        response = api.post("/onnx-infer", data={"skip_save_images": "true"},
                            files={"audio_file": ("speech.flac", speech_bytes)})
        assert response.status_code == 404 and "'house'" in response.json()["error"]


def test_a_request_that_fails_unexpectedly_is_counted_as_a_500(api, speech_bytes, monkeypatch):
    from frontend import metrics

    def broken(*_):
        raise RuntimeError("a bug")

    counter = metrics.REQUESTS.labels("/onnx-infer", "POST", "500")
    before = counter._value.get()
    monkeypatch.setattr(api.app.state.services, "avatar", broken)
    with pytest.raises(RuntimeError, match="a bug"):  # TestClient hands the server's exception on
        post_speech(api, speech_bytes, skip_save_images="true")
    assert counter._value.get() == before + 1


def test_connections_do_not_pile_up_across_requests(api, speech_bytes):
    """In-flight requests run on the client's own threads: no new connections per request."""
    post_speech(api, speech_bytes, fps="12", skip_save_images="true")
    before = len(api.app.state.services.client._workers)
    for _ in range(3):
        assert post_speech(api, speech_bytes, fps="12", skip_save_images="true").status_code == 200
    assert len(api.app.state.services.client._workers) <= before + 2


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height, with one empty data chunk: what a
    decompression bomb looks like to a server that reads headers before pixels."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + \
        chunk(b"IEND", b"")


@pytest.mark.parametrize("width, height", [(16000, 16000), (5000, 4000)])
def test_huge_images_are_refused_before_decoding(api, settings, width, height):
    response = api.post("/avatars", data={"avatar_id": "bomb"},
                        files={"file": ("bomb.png", png_header(width, height), "image/png")})
    assert response.status_code == 413, response.text
    assert f"{width}x{height}" in response.json()["error"] and "megapixels" in response.json()["error"]
    assert not (settings.avatar_dir / "bomb").exists()


def test_pixel_limit_is_a_setting_for_images_and_videos(triton, tmp_path, face_png, face_image):
    small = Settings(triton_url=triton.grpc_url, avatar_dir=tmp_path / "avatars", max_image_pixels=256 * 256)
    with TestClient(create_app(small)) as api:
        image = api.post("/avatars", data={"avatar_id": "big"}, files={"file": ("a.png", face_png)})
        assert image.status_code == 413 and "512x512" in image.json()["error"]
        buffer = io.BytesIO()
        with av.open(buffer, "w", format="mp4") as out:
            stream = out.add_stream("libx264", rate=25)
            stream.width, stream.height, stream.pix_fmt = 512, 512, "yuv420p"
            for packet in stream.encode(av.VideoFrame.from_ndarray(face_image, format="bgr24")):
                out.mux(packet)
            for packet in stream.encode(None):
                out.mux(packet)
        video = api.post("/avatars", data={"avatar_id": "big"}, files={"file": ("a.mp4", buffer.getvalue())})
        assert video.status_code == 413 and "video is 512x512" in video.json()["error"]


def test_settings_parse_values_and_refuse_bad_ones(monkeypatch):
    from pydantic import ValidationError

    monkeypatch.setenv("MUSETALK_SYNTHETIC_WEIGHTS", "false")
    monkeypatch.setenv("MUSETALK_BATCH_SIZE", "8")
    settings = Settings()
    assert settings.synthetic_weights is False and settings.batch_size == 8
    monkeypatch.setenv("MUSETALK_BATCH_SIZE", "0")
    with pytest.raises(ValidationError, match="batch_size"):
        Settings()
