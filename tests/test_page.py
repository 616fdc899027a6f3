"""The page (GET /) in a real browser: Debian's Chromium driven by Playwright, against a real
uvicorn process and the real local Triton. Screenshots land in build/test/."""
from __future__ import annotations

import numpy as np
import pytest
import soundfile

from support import BUILD, CHANGED, SPEECH, mouth_moves

LONG_SPEECH = BUILD / "speech_x3.wav"  # 16.7 s: long enough to interrupt


@pytest.fixture(scope="module")
def long_speech_file():
    samples, rate = soundfile.read(str(SPEECH), dtype="float32")
    LONG_SPEECH.parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(str(LONG_SPEECH), np.tile(samples, 3), rate)
    return LONG_SPEECH


@pytest.fixture
def page(browser, frontend_server):
    context = browser.new_context(viewport={"width": 1200, "height": 1000})
    page = context.new_page()
    errors = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(frontend_server.url + "/")
    page.wait_for_function("document.querySelector('#avatar').options.length > 0")
    yield page
    context.close()
    assert not errors, errors


def triton_executions(url: str) -> int:
    from client import MuseTalkClient

    with MuseTalkClient(url) as client:
        return sum(int(client.statistics(m).get("execution_count", 0)) for m in ("audio_encoder", "unet"))


def test_the_avatar_is_live_and_idle_as_soon_as_the_page_opens(page, triton):
    page.wait_for_function("window.musetalk.state === 'idle' && window.musetalk.presented > 10", timeout=30_000)
    assert "random weights" in page.locator("#synthetic").inner_text()
    before, presented = triton_executions(triton.grpc_url), page.evaluate("window.musetalk.presented")
    page.wait_for_timeout(3000)
    shown = page.evaluate("window.musetalk.presented") - presented
    assert 60 <= shown <= 80, shown  # about 25 frames a second, decoded and displayed
    assert triton_executions(triton.grpc_url) == before  # idle: no Triton call
    assert page.evaluate("document.querySelector('video').videoWidth") == 512
    page.screenshot(path=str(BUILD / "page-idle.png"))


def test_speech_from_a_file_plays_and_interrupt_returns_to_idle(page, long_speech_file):
    page.wait_for_function("window.musetalk.state === 'idle' && window.musetalk.presented > 10", timeout=30_000)
    idle = page.evaluate(CHANGED, None)
    page.set_input_files("#audio-file", str(long_speech_file))
    page.click("#upload-button")
    page.wait_for_function("window.musetalk.state === 'speaking'", timeout=60_000)
    assert mouth_moves(page, idle)
    latency = page.evaluate("window.musetalk.latencies")
    assert len(latency) == 1 and 0 < latency[0] < 10_000
    assert page.locator("#latency").inner_text().endswith("over 1)")
    page.screenshot(path=str(BUILD / "page-speaking.png"))
    page.click("#interrupt-button")
    page.wait_for_function("window.musetalk.events.some(e => e.type === 'speech_finished' && e.interrupted)",
                           timeout=10_000)
    page.wait_for_timeout(500)
    assert page.evaluate("window.musetalk.state") == "idle"
    assert page.evaluate(CHANGED, idle) < 8  # the avatar's own face again


def test_speech_into_the_microphone_is_spoken_by_the_avatar(page):
    """Chromium's fake capture device plays the speech fixture into the microphone."""
    page.wait_for_function("window.musetalk.state === 'idle' && window.musetalk.presented > 10", timeout=30_000)
    page.click("#mic-button")
    page.wait_for_function("window.musetalk.state === 'speaking'", timeout=60_000)
    page.click("#stop-button")
    page.wait_for_function("window.musetalk.events.some(e => e.type === 'speech_finished')", timeout=120_000)
    assert page.evaluate("window.musetalk.error") is None
    assert page.evaluate("window.musetalk.latencies.length") == 1


def test_preparing_an_avatar_without_a_face_shows_the_error(page, tmp_path):
    import cv2
    import skimage.data

    cups = tmp_path / "cups.png"
    cv2.imwrite(str(cups), cv2.cvtColor(skimage.data.coffee(), cv2.COLOR_RGB2BGR))
    page.click("summary")
    page.fill("#new-id", "cups")
    page.set_input_files("#new-file", str(cups))
    page.click("#prepare button")
    page.wait_for_function("document.querySelector('#prepare-status').classList.contains('error')")
    assert "no face" in page.locator("#prepare-status").inner_text()


def test_with_api_keys_the_page_asks_for_one_and_speaks_with_the_sessions_tokens(browser, keyed, long_speech_file):
    """On a front end with keys: no key, the page asks for one; with one (#key=..., kept out of the
    address bar), it opens its session, watches it with the viewer token and speaks through the
    speech socket with the speaker token."""
    from support import KEYS

    context = browser.new_context()
    page = context.new_page()
    errors = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    try:
        page.goto(keyed.url + "/")
        page.wait_for_selector("#key-form", state="visible", timeout=30_000)
        assert "needs an API key" in page.locator("#status").inner_text()
        page.goto(keyed.url + f"/#key={KEYS['beta']}")
        page.reload()  # a new page load reads the fragment
        page.wait_for_function("window.musetalk.state === 'idle' && window.musetalk.presented > 10", timeout=30_000)
        assert KEYS["beta"] not in page.url
        idle = page.evaluate(CHANGED, None)
        page.set_input_files("#audio-file", str(long_speech_file))
        page.click("#upload-button")
        page.wait_for_function("window.musetalk.state === 'speaking'", timeout=60_000)
        assert mouth_moves(page, idle)
    finally:
        context.close()
    assert not errors, errors
