"""make demo: the main job, end to end, from one command.

Exports the models (real weights if models/ holds them, else synthetic
full-size weights, said loudly), starts the local Triton and the front end,
prepares the demo avatar from a real photograph, sends a few seconds of real
speech to POST /onnx-infer, saves the mp4 and reports each stage's time; then
stops everything it started. A second run reuses the exports and the avatar.

Machines differ by orders of magnitude (a GPU makes a frame in milliseconds, a 2-core CPU
in seconds), so before speaking the demo reads this server's pace (the front end sends a
first frame through Triton before it reports ready) and prints its estimate. Where the
whole speech would take longer than --budget-minutes, it speaks the part that fits and
says so (--all speaks all of it). Batches are sized to take seconds here, so the progress
bar moves by a few frames at a time.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import httpx
import soundfile
from tqdm import tqdm

from client.readiness import wait_for
from contract import logs
from stack.exports import PROFILES, ensure_exported, real_weights
from stack.frontend_process import LOCAL_SERVER_SETTINGS, FrontEnd
from stack.samples import DEMO_SPEECH
from triton_local.launch import start as start_triton
from triton_local.processes import free_port, listening
from triton_local.server import BUILD, Ports, http_url_beside
from triton_local.supervisor import Supervisor

AVATAR_ID = "demo"
BUDGET_MINUTES = 7.0  # of generation: with the server's start, about 10 minutes after the first export
OVERHEAD = 1.1  # audio features, blending and encoding beside the frames themselves
PREPARE_TIMEOUT_S = 600.0  # one photograph: seconds on any machine; a stuck job fails the demo, never hangs it
BATCH_SECONDS = 12.0  # a batch's time on a slow server: the progress bar's step
DEFAULT_BATCH = 16
READY_TIMEOUT_S = 600


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m stack.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--speech", type=Path, default=DEMO_SPEECH)
    p.add_argument("--fps", type=int, default=25)
    p.add_argument("--profile", choices=PROFILES, default="full",
                   help="tiny: small random models, for a one-minute look at the whole path")
    p.add_argument("--output", type=Path, default=BUILD / "demo" / "musetalk_demo.mp4")
    p.add_argument("--triton-url", help="gRPC host:port of a running Triton (e.g. the GPU "
                   "container): skip the export and the local server")
    p.add_argument("--budget-minutes", type=float, default=BUDGET_MINUTES,
                   help="speak only the part of the speech this machine generates within it (default %(default)s)")
    p.add_argument("--all", action="store_true", help="speak the whole speech, however long it takes here")
    args = p.parse_args(argv)

    logs.configure()
    real = real_weights(args.profile)
    supervisor = None
    if args.triton_url:
        step("1-2/5 use the Triton server at " + args.triton_url)
        server = RemoteTriton(args.triton_url)
        real = True  # whatever it serves: the demo cannot tell
    else:
        step("1/5 export the networks to ONNX" + ("" if real else " (SYNTHETIC random weights)"))
        repository = ensure_exported(args.profile)
        if repository is None:
            return 1
        step("2/5 start the local Triton server")
        server = start_triton(repository, Ports.defaults_or_free())
        supervisor = Supervisor(server).start()  # a tritonserver that dies is started again
    frontend = None
    try:
        step("3/5 start the front end")
        frontend = FrontEnd(server.grpc_url, 8080 if not listening(8080) else free_port(), env={
            "MUSETALK_AVATAR_DIR": str(BUILD / "demo" / f"avatars-{args.profile}"),
            # every request names the demo's own avatar (prepared once the front end is ready):
            # no default avatar, which readiness would otherwise wait for
            "MUSETALK_DEFAULT_AVATAR": "",
            # one batch computing, the next queued: the server stays busy and batches stay small
            "MUSETALK_IN_FLIGHT": "2",
            **(LOCAL_SERVER_SETTINGS if supervisor else {}),
            **({"MUSETALK_MAX_REQUEST_SECONDS": "off"} if args.all else {}),
        }).start()
        print(f"front end: {frontend.url} (API docs: {frontend.url}/docs)")
        # Ready: Triton's models answer, and one frame has been through them (its pace is known).
        if not frontend.wait_until_ready(READY_TIMEOUT_S):
            raise SystemExit(f"the front end was not ready within {READY_TIMEOUT_S:.0f} s; see {frontend.log_file}")
        with httpx.Client(base_url=frontend.url, timeout=None) as http:
            step("4/5 prepare the avatar from a photograph")
            prepare_avatar(http)
            step("5/5 speech -> video through POST /onnx-infer")
            plan = Plan.for_server(http, args.speech, args.fps, args.budget_minutes * 60, args.all)
            video, timings = speak(http, server, plan)
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_bytes(video)
    finally:
        if frontend:
            frontend.stop()
        (supervisor or server).stop()
    report(args.output, timings, real)
    return 0


class RemoteTriton:
    """A server this demo did not start (and so does not stop)."""

    def __init__(self, grpc_url: str):
        self.grpc_url, self.http_url = grpc_url, http_url_beside(grpc_url)

    def stop(self) -> None:
        pass


def step(title: str) -> None:
    print(f"\n=== {title} ===", flush=True)


def prepare_avatar(http: httpx.Client) -> None:
    existing = http.get(f"/avatars/{AVATAR_ID}")
    if existing.status_code == 200 and existing.json()["status"] == "ready":
        print(f"avatar '{AVATAR_ID}' already prepared: reused")
        return
    import skimage.data

    photo = cv2.imencode(".png", cv2.cvtColor(skimage.data.astronaut(), cv2.COLOR_RGB2BGR))[1]
    started = time.perf_counter()
    response = http.post("/avatars", data={"avatar_id": AVATAR_ID},
                         files={"file": ("astronaut.png", photo.tobytes(), "image/png")})

    def prepared() -> bool:  # a job (202): followed until it ends
        nonlocal response
        if response.status_code == 202 or response.json().get("status") in ("queued", "preparing"):
            response = http.get(f"/avatars/{AVATAR_ID}")
        return response.status_code != 202 and response.json().get("status") not in ("queued", "preparing")

    if not wait_for(prepared, PREPARE_TIMEOUT_S, 1.0):
        raise SystemExit(f"the avatar was not prepared within {PREPARE_TIMEOUT_S:.0f} s: {response.text}")
    if response.status_code >= 400 or response.json().get("status") == "failed":
        raise SystemExit(f"preparing the avatar failed: {response.text}")
    print(f"avatar '{AVATAR_ID}' prepared from scikit-image's astronaut photograph "
          f"in {time.perf_counter() - started:.1f} s")


@dataclass
class Plan:
    """What the demo speaks, in batches of what size, and how long it should take here."""

    speech: Path
    fps: int
    frames: int
    batch_size: int
    seconds_per_frame: float | None

    @classmethod
    def for_server(cls, http: httpx.Client, speech: Path, fps: int, budget_s: float, everything: bool) -> Plan:
        pace = http.get("/info").json().get("seconds_per_frame")
        duration = soundfile.info(str(speech)).duration
        frames = math.floor(duration * fps)
        if not pace:
            print(f"{frames} frames; this server's pace is not known yet")
            return cls(speech, fps, frames, DEFAULT_BATCH, None)
        cost = pace * OVERHEAD
        print(f"this server makes a frame in ~{pace:.3g} s: {frames} frames ({duration:.1f} s of speech at {fps} fps) "
              f"should take ~{_minutes(frames * cost)}")
        fits = math.floor(budget_s / cost)
        if frames > fits and not everything:
            frames = max(fits, fps)  # at least one second
            speech = trimmed(speech, frames / fps)
            print(f"that is over the {_minutes(budget_s)} budget: speaking the first {frames / fps:.1f} s "
                  f"({frames} frames, ~{_minutes(frames * cost)}); --all speaks all of it")
        # Batches of a few seconds each on a slow server, so the progress bar moves; full ones on a fast one.
        batch = max(1, min(DEFAULT_BATCH, round(BATCH_SECONDS / pace)))
        return cls(speech, fps, frames, batch, pace)


def trimmed(speech: Path, seconds: float) -> Path:
    """The first `seconds` of `speech`, as a file beside the demo's output."""
    samples, rate = soundfile.read(str(speech), frames=int(seconds * soundfile.info(str(speech)).samplerate))
    path = BUILD / "demo" / f"{speech.stem}_first_{seconds:.1f}s.flac"
    path.parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(str(path), samples, rate)
    return path


def _minutes(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


def speak(http: httpx.Client, server, plan: Plan) -> tuple[bytes, dict]:
    """POST the speech; a progress bar follows the frames Triton's vae_decoder has produced."""
    frames, speech = plan.frames, plan.speech
    result: dict = {}

    def post():
        try:
            result["response"] = http.post("/onnx-infer", data={
                "avatar_id": AVATAR_ID, "fps": str(plan.fps), "batch_size": str(plan.batch_size),
            }, files={"audio_file": (speech.name, speech.read_bytes())})
        except Exception as error:  # noqa: BLE001 - reported below
            result["error"] = error

    request = threading.Thread(target=post)
    start_count = _decoded(server)
    request.start()
    with tqdm(total=frames, desc="frames generated", unit="frame") as bar:
        while request.is_alive():
            request.join(1.0)
            bar.update(min(frames, _decoded(server) - start_count) - bar.n)
        bar.update(frames - bar.n)
    if "error" in result:
        raise result["error"]
    response = result["response"]
    if response.status_code != 200:
        raise SystemExit(f"POST /onnx-infer failed ({response.status_code}): {response.text}")
    return response.content, json.loads(response.headers["x-timings"])


def _decoded(server) -> int:
    try:
        with httpx.Client(timeout=5) as http:
            stats = http.get(f"http://{server.http_url}/v2/models/vae_decoder/stats").json()
        return int(stats["model_stats"][0]["inference_count"])  # frames, not requests
    except Exception:  # noqa: BLE001 - progress is best effort
        return 0


def report(output: Path, t: dict, real: bool) -> None:
    step("done")
    print(f"video: {output.resolve()} ({output.stat().st_size / 1e6:.2f} MB, {t['frames']} frames "
          f"at {t['fps']} fps, {t['audio_seconds']} s of speech)")
    print(f"  audio features (log-mel + audio_encoder):  {t['audio_features']:8.2f} s")
    print(f"  waiting for Triton (pe + unet + decoder):  {t['waiting_for_triton']:8.2f} s")
    print(f"  blending:                                  {t['blending']:8.2f} s")
    print(f"  encoding (H.264 + AAC):                    {t['encoding']:8.2f} s")
    print(f"  total:                                     {t['total']:8.2f} s  "
          f"({t['frames_per_second']:.2f} frames/s)")
    if not real:
        print("NOTE: SYNTHETIC random weights: the timings are real, the lips are noise, not speech.")


if __name__ == "__main__":
    sys.exit(main())
