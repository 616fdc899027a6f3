"""Load on the whole service, as users make it: whole answers, streamed answers, live sessions and
avatar preparations mixed, at rising concurrency; then a soak.

    python -m benchmarks.load                               # starts the local stack (tiny models)
    python -m benchmarks.load --steps 1,4,16 --step-seconds 60 --soak-minutes 30
    python -m benchmarks.load --url http://host:8080 --frontend-pid 1234
    python -m benchmarks.load --steps 16 --soak-minutes 0 --label tiny_cpu_capacity300 \
        --env MUSETALK_MAX_FRAMES_IN_PROGRESS=300   # a capacity sized for this machine: load shed

Our own script rather than Locust: the mix has WebSocket live sessions and streamed fMP4 whose
time to first frame is the figure that matters, which Locust measures only with custom users
(as much code as this), and it needs no other dependency. Each worker thread loops: pick a kind
(whole 40%, streamed 30%, live 20%, preparation 10%), do it, record status, latency and time to
first frame. A sampler notes the front end's memory and threads every second. The soak runs a
fixed concurrency for minutes: front-end memory after the warm-up against the end (its growth),
threads at the start and the end, and, once the stack is stopped, any process left behind.
"""
from __future__ import annotations

import argparse
import io
import json
import random
import statistics
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import psutil
import soundfile

from benchmarks.provenance import invocation, machine, publish
from benchmarks.streaming import local_stack
from stack.samples import SPEECH

RESULTS = Path(__file__).resolve().parent / "results"
MIX = (("whole", 0.4), ("stream", 0.3), ("live", 0.2), ("prepare", 0.1))


@dataclass
class Outcome:
    kind: str
    status: int  # HTTP status, or 1000 / 4000 + status for a WebSocket
    seconds: float
    first_frame: float | None = None


@dataclass
class Recorder:
    outcomes: list[Outcome] = field(default_factory=list)
    memory: list[tuple[float, float, int]] = field(default_factory=list)  # (t, rss MB, threads)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, outcome: Outcome) -> None:
        with self.lock:
            self.outcomes.append(outcome)


def clip(seconds: float) -> tuple[bytes, bytes, int]:
    """(FLAC, 16-bit PCM, rate) of `seconds` of the speech fixture."""
    samples, rate = soundfile.read(str(SPEECH), dtype="float32")
    samples = samples[: int(seconds * rate)]
    buffer = io.BytesIO()
    soundfile.write(buffer, samples, rate, format="FLAC")
    return buffer.getvalue(), (np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes(), rate


def photo_clip() -> bytes:
    """A short video of a face (the astronaut, moving a little) to prepare."""
    import av
    import cv2
    import skimage.data

    face = cv2.resize(cv2.cvtColor(skimage.data.astronaut(), cv2.COLOR_RGB2BGR), (320, 320))
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = 320, 320, "yuv420p"
        for i in range(20):
            frame = av.VideoFrame.from_ndarray(np.roll(face, i % 4, axis=1), format="bgr24")
            frame.pts = i
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    return buffer.getvalue()


class Work:
    def __init__(self, url: str, seconds: float):
        self.url = url
        self.flac, self.pcm, self.rate = clip(seconds)
        self.video = photo_clip()

    def whole(self) -> Outcome:
        started = time.monotonic()
        answer = httpx.post(f"{self.url}/onnx-infer", files={"audio_file": ("s.flac", self.flac)}, timeout=600)
        return Outcome("whole", answer.status_code, time.monotonic() - started)

    def stream(self) -> Outcome:
        started, first = time.monotonic(), None
        with httpx.stream("POST", f"{self.url}/onnx-infer", data={"stream": "true"},
                          files={"audio_file": ("s.flac", self.flac)}, timeout=600) as answer:
            for _ in answer.iter_raw():
                first = first or time.monotonic() - started
        return Outcome("stream", answer.status_code, time.monotonic() - started, first if answer.is_success else None)

    def live(self) -> Outcome:
        from websockets.exceptions import ConnectionClosed
        from websockets.sync.client import connect

        started, first, status = time.monotonic(), None, 1000
        step = self.rate // 25 * 2  # 40 ms at real-time pace
        try:
            with connect(f"{self.url.replace('http', 'ws')}/ws/live?sample_rate={self.rate}", max_size=None,
                         open_timeout=60) as ws:
                json.loads(ws.recv())
                seen = [None]  # when the first frame came, noted by the reader
                reader = threading.Thread(target=self._read_live, args=(ws, started, seen), daemon=True)
                reader.start()
                for i, offset in enumerate(range(0, len(self.pcm), step)):
                    ws.send(self.pcm[offset : offset + step])
                    time.sleep(max(0.0, started + (i + 1) * 0.04 - time.monotonic()))
                ws.send(json.dumps({"type": "end"}))
                reader.join(600)
                first = seen[0]
                status = ws.close_code or 1000
        except ConnectionClosed as closed:
            status = closed.rcvd.code if closed.rcvd else 1006
        return Outcome("live", status, time.monotonic() - started, first)

    @staticmethod
    def _read_live(ws, started: float, seen: list) -> None:
        from websockets.exceptions import ConnectionClosed

        try:
            for message in ws:
                if isinstance(message, bytes) and seen[0] is None:
                    seen[0] = time.monotonic() - started
        except ConnectionClosed:
            pass

    def prepare(self) -> Outcome:
        started, avatar_id = time.monotonic(), f"load-{uuid.uuid4().hex[:8]}"
        answer = httpx.post(f"{self.url}/avatars", data={"avatar_id": avatar_id},
                            files={"file": ("clip.mp4", self.video)}, timeout=600)
        status = answer.status_code
        while status == 202 or (status == 200 and answer.json().get("status") in ("queued", "preparing")):
            time.sleep(0.5)
            answer = httpx.get(f"{self.url}/avatars/{avatar_id}", timeout=60)
            status = answer.status_code
        if answer.is_success:
            httpx.delete(f"{self.url}/avatars/{avatar_id}", timeout=60)
        return Outcome("prepare", status, time.monotonic() - started)


def run_load(work: Work, concurrency: int, seconds: float, recorder: Recorder, rng: random.Random) -> None:
    stop = time.monotonic() + seconds
    kinds, weights = zip(*MIX)

    def worker(seed: int) -> None:
        local = random.Random(seed)
        while time.monotonic() < stop:
            kind = local.choices(kinds, weights)[0]
            try:
                outcome = getattr(work, kind)()
            except Exception as error:  # noqa: BLE001 - a failure is a result here
                outcome = Outcome(kind, 599, 0.0)
                print(f"{kind}: {type(error).__name__}: {error}", flush=True)
            recorder.add(outcome)
            if outcome.status == 429:
                time.sleep(1.0 + local.random())  # a client that backs off

    threads = [threading.Thread(target=worker, args=(rng.random(),)) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def sample_memory(pid: int | None, recorder: Recorder, stop: threading.Event) -> None:
    started = time.monotonic()
    while pid and not stop.wait(1.0):
        try:
            process = psutil.Process(pid)
            recorder.memory.append((time.monotonic() - started, process.memory_info().rss / 2**20,
                                    process.num_threads()))
        except psutil.NoSuchProcess:
            return


def summarise(outcomes: list[Outcome], seconds: float) -> dict:
    rows = {}
    for kind, _ in MIX:
        of = [o for o in outcomes if o.kind == kind]
        ok = [o for o in of if o.status in (200, 201, 1000)]
        latencies = [o.seconds for o in ok]
        firsts = [o.first_frame for o in ok if o.first_frame is not None]
        rows[kind] = {
            "requests": len(of), "ok": len(ok), "429": sum(o.status in (429, 4429) for o in of),
            "errors": sum(o.status not in (200, 201, 1000, 429, 4429) for o in of),
            "p50_s": round(statistics.median(latencies), 2) if latencies else None,
            "p95_s": round(float(np.percentile(latencies, 95)), 2) if latencies else None,
            "first_frame_p50_s": round(statistics.median(firsts), 2) if firsts else None,
        }
    rows["all"] = {"requests_per_minute": round(len(outcomes) / seconds * 60, 1),
                   "ok_per_minute": round(sum(r["ok"] for r in rows.values()) / seconds * 60, 1)}
    return rows


def left_behind(before: set[int]) -> list[str]:
    """Processes of ours (tritonserver, its stubs, uvicorn) still running that were not before."""
    names = ("tritonserver", "triton_python_backend_stub", "uvicorn")
    return [f"{p.pid} {' '.join(p.cmdline()[:3])}" for p in psutil.process_iter(["cmdline"])
            if p.pid not in before and any(n in " ".join(p.info["cmdline"] or []) for n in names)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.load", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", help="a running front end (default: start the local stack, tiny models)")
    p.add_argument("--frontend-pid", type=int, help="its process, for memory and threads")
    p.add_argument("--steps", default="1,4,16", help="concurrency of each step")
    p.add_argument("--step-seconds", type=float, default=60)
    p.add_argument("--soak-minutes", type=float, default=30)
    p.add_argument("--soak-concurrency", type=int, default=4)
    p.add_argument("--clip-seconds", type=float, default=2.0)
    p.add_argument("--label", default="tiny_cpu")
    p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                   help="a setting of the local front end, e.g. MUSETALK_MAX_FRAMES_IN_PROGRESS=300 (repeatable)")
    args = p.parse_args(argv)
    settings = dict(item.split("=", 1) for item in args.env)
    before = {process.pid for process in psutil.process_iter()}
    server = frontend = None
    url, pid = args.url, args.frontend_pid
    if not url:
        server, frontend = local_stack("tiny", settings)
        url, pid = frontend.url, frontend.process.pid
    rng, results = random.Random(7), {"steps": [], "soak": None}
    try:
        work = Work(url, args.clip_seconds)
        for concurrency in map(int, args.steps.split(",")):
            recorder, stop = Recorder(), threading.Event()
            sampler = threading.Thread(target=sample_memory, args=(pid, recorder, stop), daemon=True)
            sampler.start()
            run_load(work, concurrency, args.step_seconds, recorder, rng)
            stop.set()
            peak = max((m for _, m, _ in recorder.memory), default=None)
            step = {"concurrency": concurrency, **summarise(recorder.outcomes, args.step_seconds),
                    "frontend_peak_mb": round(peak) if peak else None}
            results["steps"].append(step)
            print(json.dumps(step), flush=True)
        if args.soak_minutes > 0:
            recorder, stop = Recorder(), threading.Event()
            sampler = threading.Thread(target=sample_memory, args=(pid, recorder, stop), daemon=True)
            sampler.start()
            run_load(work, args.soak_concurrency, args.soak_minutes * 60, recorder, rng)
            stop.set()
            time.sleep(5)  # what the last requests left is released
            results["soak"] = soak_summary(recorder, args, pid)
            print(json.dumps(results["soak"]), flush=True)
    finally:
        if frontend:
            frontend.stop()
        if server:
            server.stop()
    if server:
        time.sleep(3)
        results["left_behind"] = left_behind(before)
    write(args, argv, results)
    return 0


WARM_UP_S = 300


def soak_summary(recorder: Recorder, args, pid: int | None) -> dict:
    memory = recorder.memory
    return {"concurrency": args.soak_concurrency, "minutes": args.soak_minutes,
            **summarise(recorder.outcomes, args.soak_minutes * 60),
            "requests": len(recorder.outcomes),
            "threads_start": memory[0][2] if memory else None, "threads_end": memory[-1][2] if memory else None,
            "memory_over_time": [(round(t), round(m)) for t, m, _ in memory[::30]]}


def memory_trend(points: list[tuple[float, float]]) -> dict:
    """The front end's memory after the warm-up, from (seconds, MB) samples: its trend (a least
    squares line: RSS swings by a hundred MB with the requests in progress, so two moments
    compared would say more about the load at those moments than about a leak) and the mean
    of each third."""
    warm = np.array([(t, m) for t, m in points if t >= WARM_UP_S], float)
    if len(warm) < 6:
        return {}
    slope = np.polyfit(warm[:, 0] / 3600, warm[:, 1], 1)[0]
    return {"rss_trend_mb_per_hour": round(float(slope), 1),
            "rss_thirds_mb": [round(float(part[:, 1].mean())) for part in np.array_split(warm, 3)],
            "rss_range_mb": [round(float(warm[:, 1].min())), round(float(warm[:, 1].max()))]}


def write(args, argv, results: dict) -> None:
    out = RESULTS / f"load_{args.label}.md"
    lines = [f"# Load ({args.label})", "", f"- produced by: `{invocation('benchmarks.load', argv)}`",
             f"- machine: {machine()}", f"- date: {time.strftime('%Y-%m-%d')}",
             "- random weights (tiny profile): real timings, no lip sync",
             f"- each request: {args.clip_seconds:g} s of speech (whole and streamed answers, a live session at "
             "real-time pace) or a 20-frame video to prepare; a client that gets 429 waits 1-2 s",
             "- front-end settings: " + (", ".join(f"`{item}`" for item in args.env) or "the defaults"), "",
             "## Rising concurrency", "",
             "| concurrency | kind | requests | ok | 429 | errors | p50 s | p95 s | first frame p50 s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for step in results["steps"]:
        for kind, _ in MIX:
            r = step[kind]
            lines.append(f"| {step['concurrency']} | {kind} | {r['requests']} | {r['ok']} | {r['429']} | "
                         f"{r['errors']} | {r['p50_s']} | {r['p95_s']} | {r['first_frame_p50_s']} |")
        lines.append(f"| {step['concurrency']} | **all** | {step['all']['requests_per_minute']}/min | "
                     f"{step['all']['ok_per_minute']}/min | | | | | front end peak {step['frontend_peak_mb']} MB |")
    soak = results.get("soak")
    if soak:
        lines += ["", f"## Soak: {soak['minutes']:g} min at concurrency {soak['concurrency']}, "
                      f"{soak['requests']} requests", "",
                  "| kind | requests | ok | 429 | errors | p50 s | p95 s |", "|---|---|---|---|---|---|---|"]
        for kind, _ in MIX:
            r = soak[kind]
            lines.append(f"| {kind} | {r['requests']} | {r['ok']} | {r['429']} | {r['errors']} | {r['p50_s']} | "
                         f"{r['p95_s']} |")
        trend = memory_trend(soak["memory_over_time"])
        if trend:
            lines += ["", f"Front-end memory (RSS) after the {WARM_UP_S // 60}-minute warm-up: between "
                          f"{trend['rss_range_mb'][0]} and {trend['rss_range_mb'][1]} MB with the requests in "
                          f"progress; mean of each third {' / '.join(map(str, trend['rss_thirds_mb']))} MB; "
                          f"trend (least squares) **{trend['rss_trend_mb_per_hour']} MB an hour**."]
        lines += ["", f"Threads: {soak['threads_start']} at the start, {soak['threads_end']} at the end.", "",
                  "Memory over time (s, MB): " + ", ".join(f"{t}:{m}" for t, m in soak["memory_over_time"])]
    if "left_behind" in results:
        lines += ["", "Processes left behind once the stack stopped: "
                  + (", ".join(results["left_behind"]) or "**none**") + "."]
    print(f"results: {publish(out, lines, results)}")


if __name__ == "__main__":
    raise SystemExit(main())
