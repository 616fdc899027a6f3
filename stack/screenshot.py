"""python -m stack.screenshot: the picture of the page in the documentation, taken from the real page.

Starts the stack on the tiny models, opens the page in Debian's Chromium (Playwright), speaks the
demo's speech into its session, and saves the page while the avatar speaks to
docs/images/page.png. Random weights: the mouth is noise, not lip sync (the page says so).
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from stack.samples import DEMO_SPEECH
from stack.serve import start
from triton_local.processes import free_port

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m stack.screenshot", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", type=Path, default=ROOT / "docs" / "images" / "page.png")
    args = p.parse_args(argv)
    chromium = shutil.which("chromium")
    if chromium is None:
        print("error: Debian's chromium is needed (apt-get install chromium)", file=sys.stderr)
        return 1
    from playwright.sync_api import sync_playwright

    stack = start("tiny", port=free_port())
    if stack is None:
        return 1
    server, frontend = stack
    try:
        assert frontend.wait_until_ready(300), f"the front end never became ready; see {frontend.log_file}"
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=chromium, args=[
                "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                "--autoplay-policy=no-user-gesture-required"])
            page = browser.new_page(viewport={"width": 1200, "height": 820})
            page.goto(frontend.url + "/")
            page.wait_for_function("window.musetalk.state === 'idle' && window.musetalk.presented > 10",
                                   timeout=60_000)
            page.set_input_files("#audio-file", str(DEMO_SPEECH))
            page.click("#upload-button")
            page.wait_for_function("window.musetalk.state === 'speaking'", timeout=60_000)
            page.wait_for_timeout(1200)
            page.evaluate("window.scrollTo(0, 0)")
            args.output.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(args.output), full_page=True)
            browser.close()
    finally:
        frontend.stop()
        server.stop()
    print(f"page: {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
