"""Streaming, measured side by side on one stack: time to first frame, live latency, sessions at once.

    python -m benchmarks.streaming --profile tiny                 # starts the local stack (tiny models)
    python -m benchmarks.streaming --profile full --sessions 1 --live-seconds 6
    python -m benchmarks.streaming --url http://gpu-host:8080     # a running front end

1. POST /onnx-infer for the same clip, whole (today's answer) and stream=true, alternated:
   time to the first byte of video (whole: the finished mp4; streamed: the first fragment).
2. WebSocket /ws/live with speech fed at real-time pace in 20, 40 and 100 ms chunks: per frame,
   the delay from sending the audio of frame i (up to its end) to receiving the fragment that
   holds frame i, measured by this client; sustained frames/s; the lag when the speech ended.
3. 1, 4 and 16 live sessions at once: per-session latency, total frames/s, and the average
   batch the Triton statistics show for unet (inferences / executions).

Random weights give real timings, not lip sync.
"""
from __future__ import annotations

import argparse
import io
import json
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import soundfile

from benchmarks.provenance import invocation, machine, publish
from frontend.video import fmp4
from stack.samples import SPEECH

RESULTS = Path(__file__).resolve().parent / "results"


def speech_pcm(seconds: float) -> tuple[bytes, int]:
    samples, rate = soundfile.read(str(SPEECH), dtype="int16")
    repeats = int(np.ceil(seconds * rate / len(samples)))
    return np.tile(samples, repeats)[: int(seconds * rate)].astype("<i2").tobytes(), rate


def flac(pcm: bytes, rate: int) -> bytes:
    buffer = io.BytesIO()
    soundfile.write(buffer, np.frombuffer(pcm, "<i2"), rate, format="FLAC")
    return buffer.getvalue()


# -- 1. time to first frame ----------------------------------------------------------------
def first_byte(url: str, speech: bytes, stream: bool) -> tuple[float, float]:
    """(seconds to the first byte of video, seconds to the last)."""
    started = time.perf_counter()
    with httpx.Client(timeout=None) as client, client.stream(
            "POST", f"{url}/onnx-infer", data={"stream": str(stream).lower()},
            files={"audio_file": ("speech.flac", speech)}) as response:
        response.raise_for_status()
        first = None
        for _ in response.iter_raw():
            first = first or time.perf_counter() - started
    return first, time.perf_counter() - started


def time_to_first_frame(url: str, speech: bytes, repeats: int) -> list[dict]:
    rows = {"whole": [], "stream": []}
    for _ in range(repeats):
        for kind in ("whole", "stream"):  # alternated, so both see the same machine
            rows[kind].append(first_byte(url, speech, kind == "stream"))
    return [{"answer": kind, "first_frame_s": round(statistics.median(f for f, _ in runs), 3),
             "last_byte_s": round(statistics.median(t for _, t in runs), 3)} for kind, runs in rows.items()]


# -- 2 and 3. live sessions ----------------------------------------------------------------
def live_session(url: str, pcm: bytes, rate: int, chunk_s: float, fps: int = 25) -> dict:
    """Real-time pace; client-side latency of every frame."""
    from websockets.sync.client import connect

    sent_at: list[tuple[int, float]] = []  # (samples sent so far, when)
    latencies, frames_received = [], [0]
    done: dict = {}

    def frame_latency(frame: int, now: float) -> float:
        needed = (frame + 1) * rate / fps
        return now - next(when for samples, when in sent_at if samples >= needed)

    with connect(f"{url.replace('http', 'ws')}/ws/live?fps={fps}&sample_rate={rate}", max_size=None) as ws:
        json.loads(ws.recv())

        def receive():
            for message in ws:
                now = time.perf_counter()
                if isinstance(message, bytes):
                    count = fmp4.video_samples(message)
                    for frame in range(frames_received[0], frames_received[0] + count):
                        latencies.append(frame_latency(frame, now))
                    frames_received[0] += count
                else:
                    message = json.loads(message)
                    if message["type"] in ("done", "error"):
                        done.update(message, ended_at=now)

        reader = threading.Thread(target=receive)
        reader.start()
        step = int(rate * chunk_s) * 2
        started = time.perf_counter()
        for i, offset in enumerate(range(0, len(pcm), step)):
            # Noted before sending: the reader may see this audio's frames before send returns.
            sent_at.append((min(len(pcm), offset + step) // 2, time.perf_counter()))
            ws.send(pcm[offset : offset + step])
            time.sleep(max(0.0, started + (i + 1) * chunk_s - time.perf_counter()))
        speech_ended = time.perf_counter()
        ws.send(json.dumps({"type": "end"}))
        reader.join()
    ms = np.array(latencies) * 1000
    return {"frames": done.get("frames"), "status": done.get("type"),
            "p50_ms": round(float(np.percentile(ms, 50)), 1), "p95_ms": round(float(np.percentile(ms, 95)), 1),
            "max_ms": round(float(ms.max()), 1),
            "frames_per_second": round(len(latencies) / (done["ended_at"] - started), 2),
            "lag_at_end_s": round(done["ended_at"] - speech_ended, 3), "encoder_runs": done.get("encoder_runs")}


def unet_counts(triton_http: str | None) -> tuple[int, int]:
    if not triton_http:
        return 0, 0
    stats = httpx.get(f"http://{triton_http}/v2/models/unet/stats").json()["model_stats"][0]
    return int(stats.get("inference_count", 0)), int(stats.get("execution_count", 0))


def sessions_at_once(url: str, pcm: bytes, rate: int, count: int, triton_http: str | None) -> dict:
    before = unet_counts(triton_http)
    started = time.perf_counter()
    with ThreadPoolExecutor(count) as pool:
        results = list(pool.map(lambda _: live_session(url, pcm, rate, 0.04), range(count)))
    elapsed = time.perf_counter() - started
    after = unet_counts(triton_http)
    inferences, executions = after[0] - before[0], after[1] - before[1]
    return {"sessions": count, "p50_ms": round(statistics.median(r["p50_ms"] for r in results), 1),
            "p95_ms": round(max(r["p95_ms"] for r in results), 1),
            "total_frames_per_second": round(sum(r["frames"] or 0 for r in results) / elapsed, 2),
            "lag_at_end_s": round(max(r["lag_at_end_s"] for r in results), 2),
            "avg_unet_batch": round(inferences / executions, 2) if executions else None}


# -- running it ----------------------------------------------------------------------------
def local_stack(profile: str, env: dict[str, str] | None = None):
    from stack.exports import ensure_exported
    from stack.frontend_process import LOCAL_SERVER_SETTINGS, FrontEnd
    from stack.serve import default_avatar_source
    from triton_local.launch import start
    from triton_local.processes import free_port
    from triton_local.server import BUILD, Ports

    repository = ensure_exported(profile)
    server = start(repository, Ports.free(), target=BUILD / "bench_triton", progress=False)
    frontend = FrontEnd(server.grpc_url, free_port(), host="127.0.0.1", log_file=BUILD / "bench_frontend.log", env={
        **LOCAL_SERVER_SETTINGS, "MUSETALK_AVATAR_DIR": str(BUILD / f"bench_avatars-{profile}"),
        "MUSETALK_MAX_LIVE_SESSIONS": "16",
        "MUSETALK_DEFAULT_AVATAR_SOURCE": default_avatar_source(), **(env or {})}).start()
    if not frontend.wait_until_ready(1800):
        raise SystemExit(f"the front end never became ready; see {frontend.log_file}")
    return server, frontend


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.streaming", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", choices=["tiny", "full"], default="tiny")
    p.add_argument("--url", help="a running front end (default: start the local stack)")
    p.add_argument("--triton-http", help="its Triton's HTTP host:port, for batch sizes")
    p.add_argument("--clip-seconds", type=float, default=3.4, help="the clip of part 1 (the demo's is 3.4 s)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--live-seconds", type=float, default=10.0)
    p.add_argument("--chunks", default="0.02,0.04,0.1")
    p.add_argument("--sessions", default="1,4,16")
    p.add_argument("--label", help="results file name (default: the profile, _cpu)")
    args = p.parse_args(argv)
    server = frontend = None
    url, triton_http = args.url, args.triton_http
    if not url:
        server, frontend = local_stack(args.profile)
        url, triton_http = frontend.url, server.http_url
    try:
        clip = flac(*speech_pcm(args.clip_seconds))
        first_byte(url, flac(*speech_pcm(0.2)), True)  # warm-up: a few frames
        ttff = time_to_first_frame(url, clip, args.repeats)
        print("time to first frame:", ttff, flush=True)
        pcm, rate = speech_pcm(args.live_seconds)
        live = [{"chunk_ms": round(c * 1000), **live_session(url, pcm, rate, c)}
                for c in map(float, args.chunks.split(","))]
        print("live:", live, flush=True)
        many = [sessions_at_once(url, pcm, rate, n, triton_http) for n in map(int, args.sessions.split(","))]
        print("sessions at once:", many, flush=True)
    finally:
        if frontend:
            frontend.stop()
        if server:
            server.stop()
    write(args, ttff, live, many)
    return 0


def write(args, ttff: list[dict], live: list[dict], many: list[dict]) -> None:
    label = args.label or f"{args.profile}_cpu"
    out = RESULTS / f"streaming_{label}.md"
    whole, streamed = (next(r for r in ttff if r["answer"] == k) for k in ("whole", "stream"))
    lines = [f"# Streaming ({args.profile} profile)", "",
             f"- produced by: `{invocation('benchmarks.streaming', None)}`", f"- machine: {machine()}",
             f"- date: {time.strftime('%Y-%m-%d')}",
             "- random weights: real timings, no lip sync", "",
             f"## Time to first frame, POST /onnx-infer, a {args.clip_seconds:g} s clip (median of {args.repeats})", "",
             "| answer | first video byte s | last byte s |", "|---|---|---|"]
    lines += [f"| {r['answer']} | {r['first_frame_s']} | {r['last_byte_s']} |" for r in ttff]
    lines += ["", f"Streamed first frame **{whole['first_frame_s'] / streamed['first_frame_s']:.1f}x sooner**.", "",
              f"## One live session, {args.live_seconds:g} s of speech at real-time pace, 25 fps", "",
              "| chunk ms | frames | latency p50 ms | p95 ms | max ms | frames/s | lag at end s | encoder runs |",
              "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['chunk_ms']} | {r['frames']} | {r['p50_ms']} | {r['p95_ms']} | {r['max_ms']} | "
              f"{r['frames_per_second']} | {r['lag_at_end_s']} | {r['encoder_runs']} |" for r in live]
    lines += ["", "## Live sessions at once (40 ms chunks)", "",
              "| sessions | latency p50 ms (median) | p95 ms (worst) | total frames/s | lag at end s (worst) "
              "| average unet batch |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['sessions']} | {r['p50_ms']} | {r['p95_ms']} | {r['total_frames_per_second']} | "
              f"{r['lag_at_end_s']} | {r['avg_unet_batch']} |" for r in many]
    print(f"results: {publish(out, lines, {'ttff': ttff, 'live': live, 'sessions': many})}")


if __name__ == "__main__":
    raise SystemExit(main())
