"""Shared fixtures: tiny-profile ONNX exports, a REAL local tritonserver, real media.

Everything here is the real thing at a small size: the tiny profile has the
same classes and tensor contracts as the full models; the server is
tritonserver from the nvidia-pytriton wheel; the face is a photograph from
scikit-image; the speech was spoken by espeak-ng.
"""
from __future__ import annotations

import json
import os
import shutil

import cv2
import numpy as np
import pytest

from export.__main__ import main as export_main
from support import BUILD, KEYED_TENANT_LIVE_SESSIONS, KEYED_TOKEN_SECONDS, KEYS, SPEECH, keys_file
from triton_local.repository import generate
from triton_local.server import LocalTriton, Ports

TINY_ONNX = BUILD / "tiny_onnx"
pytest_plugins = ["shared_server", "pytester"]


@pytest.fixture(scope="session")
def tiny_onnx():
    """The five networks exported in the tiny profile (re-exported only when stale)."""
    assert export_main(["--synthetic", "--profile", "tiny", "--repository", str(TINY_ONNX)]) == 0
    return TINY_ONNX


@pytest.fixture(scope="session")
def triton(tiny_onnx) -> LocalTriton:
    """A real tritonserver serving the tiny models through the generated local repository,
    supervised: if it dies, the test running then fails with its log's tail and it is started
    again, on the same ports, for the tests after it (tests/shared_server.py)."""
    repository = BUILD / "triton_repository"
    generate(repository, tiny_onnx)
    server = LocalTriton(repository, Ports.free(), log_file=BUILD / "triton.log")
    server.start(timeout=300)
    from shared_server import supervised  # the plugin (pytest_plugins), imported by pytest first

    with supervised(server):
        yield server


@pytest.fixture(scope="session")
def speech_bytes() -> bytes:
    """5.6 s of real English speech (espeak-ng), 22.05 kHz mono FLAC."""
    return SPEECH.read_bytes()


@pytest.fixture(scope="session")
def face_image() -> np.ndarray:
    """A real photograph of a face (BGR): scikit-image's astronaut (Eileen Collins)."""
    import skimage.data

    return cv2.cvtColor(skimage.data.astronaut(), cv2.COLOR_RGB2BGR)


@pytest.fixture(scope="session")
def face_png(face_image) -> bytes:
    return cv2.imencode(".png", face_image)[1].tobytes()


@pytest.fixture(scope="session")
def publish_ports() -> dict[str, int]:
    """The ports of the media servers sessions are published to (test_publish.py starts them):
    chosen before the front end starts, which allows publishing there and nowhere else."""
    from triton_local.processes import free_port

    return {"whip": free_port(), "rtmp": free_port()}


@pytest.fixture(scope="session")
def frontend_server(triton, tmp_path_factory, face_png, publish_ports):
    """The front end as users run it: uvicorn in its own process, against the test Triton,
    its default avatar prepared from the astronaut photograph before it reports ready."""
    from stack.frontend_process import FrontEnd
    from triton_local.processes import free_port

    folder = tmp_path_factory.mktemp("frontend")
    photo = folder / "astronaut.png"
    photo.write_bytes(face_png)
    server = FrontEnd(triton.grpc_url, free_port(), log_file=BUILD / "frontend.log", host="127.0.0.1", env={
        "MUSETALK_AVATAR_DIR": str(folder / "avatars"), "MUSETALK_DEFAULT_AVATAR_SOURCE": str(photo),
        "MUSETALK_BATCH_SIZE": "8", "MUSETALK_MAX_LIVE_SESSIONS": "4",
        "MUSETALK_PUBLISH_TO": json.dumps([f"http://127.0.0.1:{publish_ports['whip']}/whip/endpoint/",
                                           f"rtmp://127.0.0.1:{publish_ports['rtmp']}/live/"]),
    }).start()
    assert server.wait_until_ready(180), f"the front end never became ready; see {server.log_file}"
    yield server
    server.stop()


@pytest.fixture(scope="session")
def keyed(triton, tmp_path_factory, face_png):
    """The front end with API keys (support.KEYS: tenants alpha and beta, operator ops), its session
    tokens lasting KEYED_TOKEN_SECONDS, a tenant holding KEYED_TENANT_LIVE_SESSIONS live sessions at
    most; its shared default avatar prepared from the astronaut photograph."""
    from stack.frontend_process import FrontEnd
    from triton_local.processes import free_port

    folder = tmp_path_factory.mktemp("keyed")
    (folder / "astronaut.png").write_bytes(face_png)
    keys_file(folder / "api-keys", KEYS)
    server = FrontEnd(triton.grpc_url, free_port(), log_file=BUILD / "frontend-keyed.log", env={
        "MUSETALK_AVATAR_DIR": str(folder / "avatars"), "MUSETALK_DEFAULT_AVATAR_SOURCE": str(folder / "astronaut.png"),
        "MUSETALK_API_KEYS_FILE": str(folder / "api-keys"), "MUSETALK_SESSION_TOKEN_SECONDS": str(KEYED_TOKEN_SECONDS),
        "MUSETALK_TENANT_LIVE_SESSIONS": str(KEYED_TENANT_LIVE_SESSIONS), "MUSETALK_BATCH_SIZE": "8",
    }).start()
    assert server.wait_until_ready(180), f"the front end with keys never became ready; see {server.log_file}"
    server.keys_file = folder / "api-keys"
    yield server
    server.stop()


CHROMIUM = shutil.which("chromium")  # where the Makefile looks: on the PATH
OPT_OUT = "MUSETALK_SKIP_BROWSER_TESTS"
FAKE_MICROPHONE = BUILD / "microphone.wav"


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium (Debian's package) under Playwright, with a fake microphone that
    speaks the speech fixture. Missing Chromium fails the page tests, unless the run opts out
    with MUSETALK_SKIP_BROWSER_TESTS=1 (then they are skipped, saying so).
    Module-scoped: Playwright's sync API runs an event loop in this thread while it is open."""
    if CHROMIUM is None:
        message = "the page tests need Debian's `chromium` package on the PATH (apt-get install chromium)"
        if os.environ.get(OPT_OUT) == "1":
            pytest.skip(f"{message}; skipped because {OPT_OUT}=1")
        pytest.fail(f"{message}, or set {OPT_OUT}=1 to skip them")
    import soundfile
    from playwright.sync_api import sync_playwright

    samples, rate = soundfile.read(str(SPEECH), dtype="int16")
    FAKE_MICROPHONE.parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(str(FAKE_MICROPHONE), samples, rate, subtype="PCM_16")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--autoplay-policy=no-user-gesture-required",
            "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
            f"--use-file-for-fake-audio-capture={FAKE_MICROPHONE}",
        ])
        yield browser
        browser.close()


