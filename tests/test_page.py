"""The page (GET /) in a real browser: Debian's Chromium driven by Playwright, against a real
uvicorn process and the real local Triton. Screenshots land in build/test/."""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
import soundfile

from support import BUILD, SPEECH

CHROMIUM = Path("/usr/bin/chromium")
FAKE_MICROPHONE = BUILD / "microphone.wav"


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium (Debian's package) under Playwright, with a fake microphone that
    speaks the speech fixture. Missing Chromium skips the page tests, except under CI=true.
    Module-scoped: Playwright's sync API runs an event loop in this thread while it is open."""
    if not CHROMIUM.exists():
        message = "the page tests need Debian's `chromium` package (apt-get install chromium)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    import soundfile
    from playwright.sync_api import sync_playwright

    samples, rate = soundfile.read(str(SPEECH), dtype="int16")
    FAKE_MICROPHONE.parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(str(FAKE_MICROPHONE), samples, rate, subtype="PCM_16")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--autoplay-policy=no-user-gesture-required",
            "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
            f"--use-file-for-fake-audio-capture={FAKE_MICROPHONE}",
        ])
        yield browser
        browser.close()


LONG_SPEECH = BUILD / "speech_x3.wav"  # 16.7 s: generation takes seconds, playback starts long before


@pytest.fixture(scope="module")
def long_speech_file():
    samples, rate = soundfile.read(str(SPEECH), dtype="float32")
    LONG_SPEECH.parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(str(LONG_SPEECH), np.tile(samples, 3), rate)
    return LONG_SPEECH, 3 * len(samples) / rate


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


def test_the_page_lists_avatars_and_says_the_weights_are_random(page):
    assert "default" in page.locator("#avatar").input_value()
    page.wait_for_selector("#synthetic", state="visible")
    assert "random weights" in page.locator("#synthetic").inner_text()


def test_uploaded_speech_plays_while_it_is_generated(page, long_speech_file):
    path, seconds = long_speech_file
    page.set_input_files("#audio-file", str(path))
    page.click("#upload-button")
    # Playing, with the avatar's own size, before the generation has finished:
    page.wait_for_function("document.querySelector('video').currentTime > 0.3", timeout=120_000)
    seen = page.evaluate("""() => ({current: document.querySelector('video').currentTime,
        width: document.querySelector('video').videoWidth, done: window.musetalk.doneAt})""")
    assert seen["width"] == 512 and seen["done"] is None, seen
    page.screenshot(path=str(BUILD / "page-playing.png"))
    page.wait_for_function("window.musetalk.doneAt !== null", timeout=300_000)
    state = page.evaluate("window.musetalk")
    assert state["error"] is None and state["frames"] == math.floor(seconds * 25)
    assert page.locator("#frames").inner_text() == str(math.floor(seconds * 25))
    assert page.locator("#ttff").inner_text().endswith(" s")
    assert page.locator("#download").is_visible()
    page.screenshot(path=str(BUILD / "page-done.png"), full_page=True)


def test_speech_into_the_microphone_comes_back_as_frames(page):
    """Chromium's fake capture device plays the speech fixture into the microphone."""
    page.click("#mic-button")
    page.wait_for_function("Number(document.querySelector('#frames').textContent) > 25", timeout=120_000)
    page.wait_for_function("document.querySelector('video').currentTime > 0", timeout=60_000)
    page.click("#stop-button")
    page.wait_for_function("window.musetalk.doneAt !== null", timeout=120_000)
    state = page.evaluate("window.musetalk")
    assert state["error"] is None and state["frames"] > 25
    assert state["latency"]["p50"] > 0
    page.screenshot(path=str(BUILD / "page-live.png"), full_page=True)


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
