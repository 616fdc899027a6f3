"""Live work first: a speaking session's speech start beside offline work, priorities on and off.

    python -m benchmarks.mixed_load                       # the local stack, tiny models, both modes
    python -m benchmarks.mixed_load --modes on --segments 6

One local Triton (tiny models) and, per mode, a front end of its own (MUSETALK_PRIORITIES on or
off) against it. In each mode a probe session, watched by one WebRTC viewer, speaks segments of
real speech sent at once (as a TTS does) and the speech start of each is measured at the client:
its first PCM byte sent -> its `speech_started` event received (the event leaves when the first
speech frame is due). Frames held (speech whose next face was not back in time: the picture
repeats) are read from the session's status. The probe speaks:

- alone;
- while one POST /onnx-infer of `--offline-seconds` of speech runs beside it (a);
- while an avatar is prepared from a `--video-frames` frame video (b);
- while three other sessions speak continuously (c).

The offline work of (a) and (b) is also timed alone, so its cost of sharing is known. Random
weights: real timings, no lip sync.
"""
from __future__ import annotations

import argparse
import asyncio
import io
import threading
import time
from pathlib import Path

import httpx
import numpy as np

from benchmarks.conversation import percentiles, speech_pcm
from benchmarks.provenance import invocation, machine, publish
from client.sessions import AvatarSession

RESULTS = Path(__file__).resolve().parent / "results"
SEGMENT_SECONDS = 2.0
PAUSE_S = 0.6  # between a segment's end and the next one: a turn of the conversation


def wav(pcm16: bytes, rate: int = 16000) -> bytes:
    import soundfile

    buffer = io.BytesIO()
    soundfile.write(buffer, np.frombuffer(pcm16, "<i2"), rate, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


def avatar_video(frames: int, fps: int = 25) -> bytes:
    """A `frames`-frame H.264 video of a face that moves a little (scikit-image's astronaut)."""
    import av
    import cv2
    import skimage.data

    photo = cv2.resize(cv2.cvtColor(skimage.data.astronaut(), cv2.COLOR_RGB2BGR), (640, 640))
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = 640, 480, "yuv420p"
        stream.options = {"preset": "ultrafast", "crf": "20"}
        for i in range(frames):
            shift = int(8 * np.sin(i / 10))
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(photo[40 + shift : 520 + shift]), format="bgr24")
            frame.pts = i
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    return buffer.getvalue()


# -- the offline work --------------------------------------------------------------------------
class Background:
    """Offline work on a thread of its own: `done` when it ended, `seconds` it took, `error`."""

    def __init__(self, work):
        self.seconds: float | None = None
        self.error: str | None = None
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(work,), daemon=True)
        self.thread.start()

    def _run(self, work) -> None:
        started = time.monotonic()
        try:
            work()
            self.seconds = time.monotonic() - started
        except Exception as error:  # noqa: BLE001 - recorded in the results
            self.error = f"{type(error).__name__}: {error}"
        finally:
            self.done.set()


def offline_generation(url: str, speech: bytes) -> None:
    answer = httpx.post(f"{url}/onnx-infer", data={"fps": "25"}, files={"audio_file": ("speech.wav", speech)},
                        timeout=1800)
    if answer.status_code != 200:
        raise RuntimeError(f"{answer.status_code} {answer.text[:200]}")


def preparation(url: str, video: bytes, avatar_id: str) -> None:
    with httpx.Client(base_url=url, timeout=120) as http:
        answer = http.post("/avatars", data={"avatar_id": avatar_id}, files={"file": ("clip.mp4", video)})
        if answer.status_code not in (201, 202):
            raise RuntimeError(f"{answer.status_code} {answer.text[:200]}")
        deadline = time.monotonic() + 1800
        while (status := http.get(f"/avatars/{avatar_id}").json()).get("status") != "ready":
            if status.get("status") == "failed" or time.monotonic() > deadline:
                raise RuntimeError(f"the preparation did not finish: {status}")
            time.sleep(0.25)
        http.delete(f"/avatars/{avatar_id}")


# -- the probe -------------------------------------------------------------------------------
async def speak_segments(session, speech, pcm: bytes, until) -> list[float]:
    """Speak `pcm` as segments until `until()`; the speech start of each."""
    starts = []
    while not until():
        sent = time.monotonic()
        await speech.send(pcm)
        await speech.end_segment()
        await speech.event("speech_started", timeout=120)
        starts.append(time.monotonic() - sent)
        await speech.event("speech_finished", timeout=120)
        await asyncio.sleep(PAUSE_S)
    return starts


async def probe(url: str, pcm: bytes, segments: int, background=None, others: int = 0) -> dict:
    """The probe session's speech starts and held frames: `segments` of them, or, with `background`
    (a function starting offline work: a Background), as many as fit while that work runs."""
    session = await AvatarSession.open(url, fps=25)
    talkers = [await AvatarSession.open(url, fps=25) for _ in range(others)]
    try:
        viewer = await session.watch()
        speech = await session.speech(16000)
        await speak_segments(session, speech, pcm, iter([False, True]).__next__)  # warm: one segment, not counted
        stop = asyncio.Event()
        chatter = [asyncio.ensure_future(keep_talking(t, pcm, stop)) for t in talkers]
        if chatter:
            await asyncio.sleep(2.0)  # the others are speaking
        before = await session.status()
        work = background() if background else None
        if work is None:
            count = [0]

            def until() -> bool:
                count[0] += 1
                return count[0] > segments
        else:
            def until() -> bool:
                return work.done.is_set()
        starts = await speak_segments(session, speech, pcm, until)
        status = await session.status()
        stop.set()
        await asyncio.gather(*chatter, return_exceptions=True)
        if work is not None:
            await asyncio.to_thread(work.done.wait)
        viewer_frames = viewer.video.qsize()
    finally:
        await session.close()
        for talker in talkers:
            await talker.close()
    result = {"segments": len(starts), **percentiles(starts), "starts_ms": [round(v * 1000) for v in starts],
              "frames_held": status["frames"].get("hold", 0) - before["frames"].get("hold", 0),
              "frames_stalled": status["frames_stalled"] - before["frames_stalled"],
              "speech_frames": status["frames"].get("speech", 0), "viewer_frames_buffered": viewer_frames}
    if work is not None:
        result.update(offline_seconds=round(work.seconds, 2) if work.seconds else None, offline_error=work.error)
    return result


async def keep_talking(session, pcm: bytes, stop: asyncio.Event) -> None:
    speech = await session.speech(16000)
    while not stop.is_set():
        await speech.send(pcm)
        await speech.end_segment()
        await speech.event("speech_finished", timeout=300)


# -- one mode --------------------------------------------------------------------------------
async def measure_mode(url: str, args) -> dict:
    pcm = speech_pcm(SEGMENT_SECONDS)
    offline = wav(speech_pcm(args.offline_seconds, trim=False))
    video = avatar_video(args.video_frames)
    results = {}
    warm = Background(lambda: offline_generation(url, wav(speech_pcm(2.0))))  # libraries, encoders, once
    await asyncio.to_thread(warm.done.wait)

    results["offline_alone_s"] = await alone(lambda: offline_generation(url, offline))
    print("offline alone:", results["offline_alone_s"], flush=True)
    results["preparation_alone_s"] = await alone(lambda: preparation(url, video, "mixed-alone"))
    print("preparation alone:", results["preparation_alone_s"], flush=True)
    results["alone"] = await probe(url, pcm, args.segments)
    print("alone:", results["alone"], flush=True)
    results["beside_offline"] = await probe(url, pcm, 0, lambda: Background(lambda: offline_generation(url, offline)))
    print("beside a generation:", results["beside_offline"], flush=True)
    results["beside_preparation"] = await probe(
        url, pcm, 0, lambda: Background(lambda: preparation(url, video, "mixed-beside")))
    print("beside a preparation:", results["beside_preparation"], flush=True)
    results["beside_sessions"] = await probe(url, pcm, args.segments, others=3)
    print("beside three speaking sessions:", results["beside_sessions"], flush=True)
    return results


async def alone(work) -> float | None:
    job = Background(work)
    await asyncio.to_thread(job.done.wait)
    if job.error:
        raise RuntimeError(job.error)
    return round(job.seconds, 2)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.mixed_load", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", choices=["tiny", "full"], default="tiny")
    p.add_argument("--modes", default="off,on", help="MUSETALK_PRIORITIES of each front end, in turn")
    p.add_argument("--segments", type=int, default=10, help="probe segments alone and beside sessions")
    p.add_argument("--offline-seconds", type=float, default=60.0, help="speech of the offline generation")
    p.add_argument("--video-frames", type=int, default=400, help="frames of the video prepared")
    p.add_argument("--label", help="results file name (default: the profile, _cpu)")
    args = p.parse_args(argv)

    from stack.exports import ensure_exported
    from stack.frontend_process import LOCAL_SERVER_SETTINGS, FrontEnd
    from stack.serve import default_avatar_source
    from triton_local.launch import start
    from triton_local.processes import free_port
    from triton_local.server import BUILD, Ports

    server = start(ensure_exported(args.profile), Ports.free(), target=BUILD / "bench_triton", progress=False)
    results = {}
    try:
        for mode in args.modes.split(","):
            frontend = FrontEnd(server.grpc_url, free_port(), host="127.0.0.1",
                                log_file=BUILD / f"bench_frontend_priorities_{mode}.log", env={
                                    "MUSETALK_AVATAR_DIR": str(BUILD / f"bench_avatars-{args.profile}"),
                                    "MUSETALK_DEFAULT_AVATAR_SOURCE": default_avatar_source(),
                                    **LOCAL_SERVER_SETTINGS, "MUSETALK_MAX_LIVE_SESSIONS": "8",
                                    "MUSETALK_PRIORITIES": {"on": "true", "off": "false"}[mode]}).start()
            try:
                if not frontend.wait_until_ready(600):
                    raise SystemExit(f"the front end never became ready; see {frontend.log_file}")
                print(f"-- priorities {mode}", flush=True)
                results[mode] = asyncio.run(measure_mode(frontend.url, args))
            finally:
                frontend.stop()
    finally:
        server.stop()
    write(args, argv, results)
    return 0


def ratio(value, reference) -> str:
    return f"{value / reference:.2f}x" if value and reference else "-"


def write(args, argv, results: dict) -> None:
    label = args.label or f"{args.profile}_cpu"
    out = RESULTS / f"mixed_load_{label}.md"
    lines = [f"# Live work first: speech start under mixed load ({args.profile} profile)", "",
             f"- produced by: `{invocation('benchmarks.mixed_load', argv)}`", f"- machine: {machine()}",
             f"- date: {time.strftime('%Y-%m-%d')}", "- random weights: real timings, no lip sync",
             f"- probe: a session watched by one aiortc viewer, segments of {SEGMENT_SECONDS:g} s of real speech sent "
             "at once; speech start = first PCM byte sent -> `speech_started` received",
             f"- (a) POST /onnx-infer of {args.offline_seconds:g} s of speech; (b) an avatar prepared from a "
             f"{args.video_frames}-frame 640x480 video; (c) three other sessions speaking continuously", ""]
    lines += ["| priorities | beside | segments | speech start p50 ms | p95 ms | max ms | p50 / p95 vs alone | frames "
              "held (stalled mid-speech) | offline work s | vs alone |", "|---|---|---|---|---|---|---|---|---|---|"]
    for mode, r in results.items():
        alone_p50, alone_p95 = r["alone"].get("p50_ms"), r["alone"].get("p95_ms")
        for key, name, reference in (("alone", "nothing", None), ("beside_offline", "(a) a generation",
                                                                   "offline_alone_s"),
                                     ("beside_preparation", "(b) a preparation", "preparation_alone_s"),
                                     ("beside_sessions", "(c) 3 sessions", None)):
            row = r[key]
            offline = row.get("offline_seconds")
            lines.append(f"| {mode} | {name} | {row['segments']} | {row.get('p50_ms')} | {row.get('p95_ms')} | "
                         f"{row.get('max_ms')} | {ratio(row.get('p50_ms'), alone_p50)} / "
                         f"{ratio(row.get('p95_ms'), alone_p95)} | {row['frames_held']} ({row['frames_stalled']}) | "
                         f"{offline if offline else '-'} | "
                         f"{ratio(offline, r[reference]) if reference else '-'} |")
        lines.append(f"| {mode} | (alone: the offline work) | | | | | | | generation {r['offline_alone_s']}, "
                     f"preparation {r['preparation_alone_s']} | |")
    print(f"results: {publish(out, lines, results)}")


if __name__ == "__main__":
    raise SystemExit(main())
