"""A soak of mixed work against the local stack: does tritonserver abort, and does the stack come
back when it is killed?

    python -m benchmarks.soak                          # 20 minutes, tiny models, one forced kill at minute 10
    python -m benchmarks.soak --minutes 5 --kill-at 0  # 5 minutes, no forced kill

The local tritonserver (supervised, as `make serve` runs it) and a front end serve, all at once:
two conversational sessions speaking segments (a third of them interrupted), a loop of POST
/onnx-infer (whole and streamed, 10 s of speech each), a loop of avatar preparations (a 60-frame
video each) and a loop of /ws/live streams. Every crash of tritonserver is counted with what its
supervisor saw. At `--kill-at` minutes tritonserver is killed outright (SIGKILL, mid-batch): the
figures are how long until the front end is ready again and until a session's next segment
speaks. Random weights: real timings, no lip sync.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import psutil
import websockets

from benchmarks.conversation import percentiles, speech_pcm
from benchmarks.mixed_load import avatar_video, wav
from benchmarks.provenance import invocation, machine, publish
from client.sessions import AvatarSession, SessionError
from frontend.video.fmp4 import read_trailer

RESULTS = Path(__file__).resolve().parent / "results"


class Soak:
    def __init__(self, url: str, seconds: float):
        self.url, self.until = url, time.monotonic() + seconds
        self.counts: Counter = Counter()
        self.errors: Counter = Counter()
        self.speech_starts: list[float] = []
        self.kill: dict = {}
        self.killed_at: float | None = None
        self.lock = threading.Lock()

    def running(self) -> bool:
        return time.monotonic() < self.until

    def failed(self, kind: str, error: BaseException | str) -> None:
        """Count it; the loop that failed waits a second (no storm of retries while Triton is away)."""
        with self.lock:
            self.errors[f"{kind}: {str(error)[:80]}"] += 1
        time.sleep(1)

    # -- the loops --------------------------------------------------------------------------
    async def session(self, number: int) -> None:
        rng = random.Random(number)
        while self.running():
            try:
                async with await AvatarSession.open(self.url, fps=25) as session:
                    await session.watch()
                    speech = await session.speech(16000)
                    while self.running():
                        await self.segment(speech, rng)
            except (TimeoutError, SessionError, OSError, websockets.WebSocketException) as error:
                await asyncio.to_thread(self.failed, "session", error)

    async def segment(self, speech, rng: random.Random) -> None:
        sent = time.monotonic()
        await speech.send(speech_pcm(rng.uniform(2, 4)))
        await speech.end_segment()
        event = await speech.event(timeout=120)
        while event["type"] not in ("speech_started", "speech_finished", "error"):
            event = await speech.event(timeout=120)
        if event["type"] == "speech_started":
            self.speech_starts.append(time.monotonic() - sent)
            if self.killed_at is not None and "speaking_again_s" not in self.kill and sent > self.killed_at:
                self.kill["speaking_again_s"] = round(time.monotonic() - self.killed_at, 2)
            if rng.random() < 0.33:
                await asyncio.sleep(rng.uniform(0.2, 1.0))
                await speech.interrupt()
                self.counts["interrupts"] += 1
        elif event["type"] == "error":
            self.errors[f"segment: {event.get('error', '')[:80]}"] += 1
        while event["type"] != "speech_finished":
            event = await speech.event(timeout=120)
        self.counts["segments"] += 1
        await asyncio.sleep(rng.uniform(0.5, 2.0))

    def generations(self) -> None:
        speech, streamed = wav(speech_pcm(10.0, trim=False)), False
        with httpx.Client(base_url=self.url, timeout=600) as http:
            while self.running():
                try:
                    answer = http.post("/onnx-infer", data={"stream": str(streamed).lower()},
                                       files={"audio_file": ("speech.wav", speech)})
                    ending = read_trailer(answer.content) if streamed and answer.status_code == 200 else None
                    if answer.status_code == 200 and (not streamed or (ending or {}).get("status") == "done"):
                        self.counts["generations"] += 1
                    elif answer.status_code == 200:  # a stream that ended with its error trailer, or none
                        self.failed("generation", f"stream ended: {(ending or {}).get('error', ending)}"[:90])
                    else:
                        self.failed("generation", f"{answer.status_code} {answer.text[:60]}")
                except httpx.HTTPError as error:
                    self.failed("generation", error)
                streamed = not streamed

    def preparations(self) -> None:
        video = avatar_video(60)
        with httpx.Client(base_url=self.url, timeout=120) as http:
            number = 0
            while self.running():
                number += 1
                avatar_id = f"soak-{number}"
                try:
                    answer = http.post("/avatars", data={"avatar_id": avatar_id}, files={"file": ("clip.mp4", video)})
                    deadline = time.monotonic() + 300
                    status = answer.json()
                    while status.get("status") not in ("ready", "failed") and time.monotonic() < deadline:
                        time.sleep(0.5)
                        status = http.get(f"/avatars/{avatar_id}").json()
                    if status.get("status") == "ready":
                        self.counts["preparations"] += 1
                    else:
                        self.failed("preparation", status.get("error", status))
                    http.delete(f"/avatars/{avatar_id}")
                except (httpx.HTTPError, ValueError) as error:
                    self.failed("preparation", error)

    async def live(self) -> None:
        pcm = speech_pcm(5.0)
        ws_url = self.url.replace("http", "ws", 1) + "/ws/live"
        while self.running():
            try:
                async with websockets.connect(ws_url, max_size=None) as socket:
                    for offset in range(0, len(pcm), 3200):
                        await socket.send(pcm[offset : offset + 3200])
                    await socket.send(json.dumps({"type": "end"}))
                    async for message in socket:
                        if isinstance(message, str) and json.loads(message)["type"] in ("done", "error"):
                            kind = json.loads(message)["type"]
                            if kind == "done":
                                self.counts["live_streams"] += 1
                            else:
                                await asyncio.to_thread(self.failed, "live", message)
                            break
            except (OSError, websockets.WebSocketException) as error:
                await asyncio.to_thread(self.failed, "live", error)
            await asyncio.sleep(2)


def killer(soak: Soak, supervisor, at_s: float) -> None:
    """Kill tritonserver outright at `at_s` seconds (once), and time its return: serving again (its
    supervisor), and the front end ready again (after its readiness check saw it gone)."""
    time.sleep(at_s)
    soak.killed_at = time.monotonic()
    os.kill(supervisor.server.process.pid, signal.SIGKILL)
    seen_gone = False
    while time.monotonic() - soak.killed_at < 300:
        if "triton_serving_again_s" not in soak.kill and supervisor.restarts and supervisor.serving.is_set():
            soak.kill["triton_serving_again_s"] = round(time.monotonic() - soak.killed_at, 2)
        try:
            ready = httpx.get(f"{soak.url}/readyz", timeout=2).status_code == 200
        except httpx.HTTPError:
            ready = False
        seen_gone = seen_gone or not ready
        if seen_gone and ready:
            soak.kill["frontend_ready_again_s"] = round(time.monotonic() - soak.killed_at, 2)
            return
        time.sleep(0.1)


async def run(soak: Soak) -> None:
    threads = [threading.Thread(target=work, daemon=True) for work in (soak.generations, soak.preparations)]
    for thread in threads:
        thread.start()
    await asyncio.gather(soak.session(1), soak.session(2), soak.live())
    for thread in threads:
        await asyncio.to_thread(thread.join)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.soak", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=20.0)
    p.add_argument("--kill-at", type=float, default=10.0, help="minute at which tritonserver is killed (0: never)")
    p.add_argument("--label", default="tiny_cpu")
    args = p.parse_args(argv)

    from stack.exports import ensure_exported
    from stack.frontend_process import LOCAL_SERVER_SETTINGS, FrontEnd
    from stack.serve import default_avatar_source
    from triton_local.launch import start
    from triton_local.processes import free_port
    from triton_local.server import BUILD, Ports
    from triton_local.supervisor import Supervisor

    supervisor = Supervisor(start(ensure_exported("tiny"), Ports.free(), target=BUILD / "soak_triton",
                                  progress=False)).start()
    frontend = FrontEnd(supervisor.server.grpc_url, free_port(), host="127.0.0.1", log_file=BUILD / "soak_frontend.log",
                        env={**LOCAL_SERVER_SETTINGS, "MUSETALK_AVATAR_DIR": str(BUILD / "soak_avatars"),
                             "MUSETALK_DEFAULT_AVATAR_SOURCE": default_avatar_source()}).start()
    try:
        if not frontend.wait_until_ready(600):
            raise SystemExit(f"the front end never became ready; see {frontend.log_file}")
        soak = Soak(frontend.url, args.minutes * 60)
        if args.kill_at:
            threading.Thread(target=killer, args=(soak, supervisor, args.kill_at * 60), daemon=True).start()
        memory = psutil.Process(frontend.process.pid).memory_info().rss
        started = time.monotonic()
        asyncio.run(run(soak))
        elapsed = time.monotonic() - started
        results = {
            "minutes": round(elapsed / 60, 1), "work_done": dict(soak.counts),
            "tritonserver_crashes": [c.status for c in supervisor.crashes],
            "unforced_crashes": len(supervisor.crashes) - (1 if soak.killed_at else 0),
            "forced_kill": soak.kill or None, "errors": dict(soak.errors),
            "speech_start": percentiles(soak.speech_starts),
            "frontend_rss_mb": {"start": round(memory / 2**20),
                                "end": round(psutil.Process(frontend.process.pid).memory_info().rss / 2**20)},
        }
    finally:
        frontend.stop()
        supervisor.stop()
    print(json.dumps(results, indent=1))
    write(args, argv, results)
    return 0 if results["unforced_crashes"] == 0 else 1


def write(args, argv, r: dict) -> None:
    out = RESULTS / f"soak_{args.label}.md"
    kill = r["forced_kill"] or {}
    lines = ["# Soak: mixed work against the local stack (tiny profile)", "",
             f"- produced by: `{invocation('benchmarks.soak', argv)}`", f"- machine: {machine()}",
             f"- date: {time.strftime('%Y-%m-%d')}", "- random weights: real timings, no lip sync",
             "- at once: two sessions speaking 2-4 s segments (a third interrupted), POST /onnx-infer of 10 s "
             "(whole and streamed, in turn), avatar preparations of a 60-frame video, /ws/live streams of 5 s", "",
             "| minutes | tritonserver crashes not forced | forced kill: Triton serving again s | front end ready "
             "again s | a session speaking again s | speech start p50 / p95 ms | front end RSS MB start / end |",
             "|---|---|---|---|---|---|---|",
             f"| {r['minutes']} | {r['unforced_crashes']} | {kill.get('triton_serving_again_s', '-')} | "
             f"{kill.get('frontend_ready_again_s', '-')} | "
             f"{kill.get('speaking_again_s', '-')} | {r['speech_start'].get('p50_ms')} / "
             f"{r['speech_start'].get('p95_ms')} | {r['frontend_rss_mb']['start']} / {r['frontend_rss_mb']['end']} |",
             "", f"Work done: {r['work_done']}.", "",
             f"Every exit of tritonserver: {r['tritonserver_crashes'] or 'none'}.",
             "", "Errors seen by the clients (the forced kill's requests in flight among them): "
             + (", ".join(f"{k} x{v}" for k, v in r["errors"].items()) or "none") + "."]
    print(f"results: {publish(out, lines, r)}")


if __name__ == "__main__":
    raise SystemExit(main())
