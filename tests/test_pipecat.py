"""MuseTalkVideoService in real Pipecat pipelines (Pipecat 1.14 in its own environment, .venv-pipecat:
its pins cannot live beside the service's), against a real front end, the real local Triton and the
tiny models; and the talk demo (`make talk`) answering its page in headless Chromium.

The pipelines run in benchmarks/pipecat_driver.py with the Pipecat environment's Python; what they
saw comes back as JSON and is checked here."""
from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path

import httpx
import pytest

from client import MuseTalkClient
from client.readiness import wait_for
from stack.frontend_process import FrontEnd
from support import BUILD, CHANGED, ROOT, SPEECH, mouth_moves, settled_count, speech_seconds
from triton_local.processes import free_port

PIPECAT_PYTHON = ROOT / ".venv-pipecat" / "bin" / "python"
DRIVER = ROOT / "benchmarks" / "pipecat_driver.py"
FPS = 12  # the tiny models make about 28 frames/s on 2 cores, all told


@pytest.fixture(scope="module")
def pipecat_python() -> Path:
    assert PIPECAT_PYTHON.exists(), "the Pipecat environment is missing: make pipecat-env"
    return PIPECAT_PYTHON


def drive(python: Path, scenario: str, url: str, *extra: str, timeout: float = 300) -> dict:
    out = subprocess.run([str(python), str(DRIVER), scenario, "--url", url, "--speech", str(SPEECH),
                          "--fps", str(FPS), *extra], capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    return {**json.loads(out.stdout.strip().splitlines()[-1]),
            "logged_errors": [line for line in out.stderr.splitlines() if "| ERROR" in line]}


def test_tts_audio_becomes_the_avatar_speaking_it_with_its_audio(pipecat_python, frontend_server):
    seen = drive(pipecat_python, "speak", frontend_server.url)
    images, expected = seen["images"], math.floor(speech_seconds() * FPS)
    assert seen["sizes"] == [[512, 512]]  # the avatar's own size
    assert not seen["errors"], seen["errors"]
    assert not seen["logged_errors"], seen["logged_errors"]  # Pipecat starts it without an ERROR log
    first_face = next(i for i, image in enumerate(images) if image["face"])
    assert first_face > FPS  # idle images before the speech
    faces = [image for image in images if image["face"] and not image["repeat"]]
    # every lip-synced frame of the turn (a few hold while generation catches up, and
    # transitions fade in and out around them)
    assert expected - 5 <= len(faces) <= expected + 3, (len(faces), expected)
    assert not images[-1]["face"] and not images[-FPS]["face"]  # idle again afterwards
    # the images come at the session's fps, timestamped by its clock
    steps = {round((b["pts"] - a["pts"]) * FPS / 1e9) for a, b in zip(images, images[1:])}
    assert steps == {1}, steps
    # its speech, as the session played it: its pauses too (the session sends no packets through
    # digital silence; the service fills them), and the silence of the frames held while
    # generation caught up (speech video and its audio wait together). The margins: the
    # fixture's last 0.4 s are near-silence, of which what comes out of the receiver's jitter
    # buffer after the session has gone idle is left to the transport's own silence (measured
    # 0.0-0.3 s); and up to 0.2 s of the idle avatar's silence (sent before DTX starts) after it.
    held = seen["status"]["frames"]["hold"] / FPS
    assert speech_seconds() - 0.35 <= seen["audio_seconds"] <= speech_seconds() + held + 0.25, \
        (seen["audio_seconds"], held)
    # and with its images: the mouth opens as the voice starts (MuseTalk's window hears two
    # frames ahead, and the face fades in over three)
    assert abs(seen["voice_first"] - images[first_face]["t"]) < 0.35, (seen["voice_first"], images[first_face]["t"])
    assert [kind for _, kind in seen["events"]] == ["TTSStartedFrame", "TTSStoppedFrame"]


def test_an_interruption_stops_the_speech_and_its_triton_requests(pipecat_python, frontend_server, triton):
    with MuseTalkClient(triton.grpc_url) as client:
        before = int(client.statistics("vae_decoder").get("inference_count", 0))
        seen = drive(pipecat_python, "interrupt", frontend_server.url)
    settled = settled_count(triton.grpc_url, "vae_decoder")
    cut = seen["interrupted_at"]
    after = [image for image in seen["images"] if image["t"] > cut + 0.3 and image["face"]]
    assert not after, after[:3]  # nothing of that turn after it, beyond the two-frame fade
    assert seen["status"]["state"] == "idle" and seen["status"]["segments"]["interrupted"] == 1
    # most of the turn never ran, by Triton's own count (that the requests in flight are cancelled
    # on Triton is test_sessions' early-interrupt test)
    assert settled - before < seen["speech_seconds"] * FPS / 2
    assert not seen["errors"], seen["errors"]


def test_a_front_end_that_goes_away_is_an_error_frame_not_a_hang(pipecat_python, triton, tmp_path, face_png):
    photo = tmp_path / "face.png"
    photo.write_bytes(face_png)
    doomed = FrontEnd(triton.grpc_url, free_port(), log_file=BUILD / "frontend-doomed.log", host="127.0.0.1",
                      env={"MUSETALK_AVATAR_DIR": str(tmp_path / "avatars"),
                           "MUSETALK_DEFAULT_AVATAR_SOURCE": str(photo)}).start()
    try:
        assert doomed.wait_until_ready(120)
        # it tries for 3 s to open a new session, then says the front end is gone
        seen = drive(pipecat_python, "frontend-gone", doomed.url, "--kill", str(doomed.process.pid),
                     "--reconnect-within", "3")
    finally:
        doomed.stop()
    assert seen["errors"] and "MuseTalk" in seen["errors"][0], seen["errors"]
    assert seen["ended_in"] < 30  # the pipeline ended cleanly, without hanging on the dead front end


@pytest.fixture(scope="module")
def talk(pipecat_python, frontend_server):
    """The demo bot, as `make talk` starts it, on the test front end."""
    port = free_port()
    log = (BUILD / "talk.log").open("wb")
    bot = subprocess.Popen([str(pipecat_python), "-m", "musetalk_pipecat.talk", "--frontend", frontend_server.url,
                            "--fps", str(FPS), "--host", "127.0.0.1", "--port", str(port)],
                           cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    def up() -> bool:
        try:
            return httpx.get(f"{url}/").status_code == 200
        except httpx.HTTPError:
            return False

    assert wait_for(up, 120, 0.5, give_up=lambda: bot.poll() is not None), \
        f"the bot did not start: {BUILD / 'talk.log'}"
    yield url
    bot.terminate()
    bot.wait(20)


def test_the_talk_demo_answers_its_page_with_the_avatar(talk, browser):
    """The bot's page, Connect clicked, Chromium's fake microphone speaking: the avatar's video
    plays in the browser, and the bot hears the turns (the avatar speaks them back)."""
    context = browser.new_context(viewport={"width": 1000, "height": 900})
    page = context.new_page()
    try:
        page.goto(f"{talk}/")
        page.click("#connect")
        page.wait_for_function("""() => { const v = document.querySelector('video');
            return v.readyState >= 2 && v.videoWidth === 512 && v.getVideoPlaybackQuality().totalVideoFrames > 5; }""",
                               timeout=120_000)
        idle = page.evaluate(CHANGED, None)  # the avatar listening: the microphone's first turn is not over
        assert mouth_moves(page, idle, seconds=60), "the avatar never spoke the turn back"
        page.screenshot(path=str(BUILD / "talk.png"))
    finally:
        context.close()
