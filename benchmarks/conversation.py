"""Conversational sessions, measured at a real WebRTC receiver (aiortc, through client.sessions).

    python -m benchmarks.conversation                      # starts the local stack (tiny models)
    python -m benchmarks.conversation --drift-minutes 1    # a shorter A/V drift session
    python -m benchmarks.conversation --url http://gpu-host:8080 --triton-http gpu-host:8000

1. Speech-start latency: first PCM byte of a segment sent -> its first speech frame received,
   for speech sent faster than real time (a TTS) and at real-time pace (40 ms chunks).
2. Interrupt latency: interrupt sent -> the first frame that is no longer the speech (the fade
   out begins), and -> the first frame of the avatar's own face.
3. A/V: for each segment of a long session, the arrival of its first speech frame against the
   arrival of its first audio: the offset, and its drift over the session.
4. Idle sessions: the front end's CPU per idle session (each watched by one viewer), and how
   many speaking sessions at once keep real time.
5. Triton calls saved, on real speech: frames whose audio window is silent (no call), and
   idle frames (no call) against calling MuseTalk for every frame of the session.

Frames are told apart by their pixels: the avatar is a photograph (its idle frame never
changes) and random weights paint noise where the mouth is. Random weights give real
timings, not lip sync. Arrival = the first RTP packet of a frame, before any jitter buffer.
"""
from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path

import httpx
import numpy as np
import psutil
import soundfile

from benchmarks.provenance import invocation, machine, publish
from benchmarks.streaming import local_stack
from client.sessions import AvatarSession
from stack.samples import SPEECH
from stack.viewing import SPEECH_CHANGE, Watch, blocks_changed, picture_losses

RESULTS = Path(__file__).resolve().parent / "results"


def speech_pcm(seconds: float | None = None, trim: bool = True) -> bytes:
    """Real speech (the espeak-ng fixture) as 16 kHz PCM: its leading silence cut, repeated to
    `seconds` (whole sentences, with their pauses)."""
    import soxr

    samples, rate = soundfile.read(str(SPEECH), dtype="float32")
    samples = soxr.resample(samples, rate, 16000)
    if trim:
        samples = samples[int(np.argmax(np.abs(samples) > 0.02)) :]
    if seconds:
        samples = np.tile(samples, int(np.ceil(seconds * 16000 / len(samples))))[: int(seconds * 16000)]
    return (np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes()


def percentiles(values: list[float]) -> dict:
    ms = np.array([v for v in values if v is not None]) * 1000
    if not len(ms):
        return {"count": 0}
    return {"count": len(ms), "p50_ms": round(float(np.percentile(ms, 50)), 1),
            "p95_ms": round(float(np.percentile(ms, 95)), 1), "max_ms": round(float(ms.max()), 1)}


async def send(speech, pcm: bytes, realtime: bool) -> float:
    """Send a segment; return when its first byte left."""
    first = time.monotonic()
    chunk = 1280 if realtime else 3200  # 40 ms at real-time pace, or 100 ms pieces at once
    for i, offset in enumerate(range(0, len(pcm), chunk)):
        await speech.send(pcm[offset : offset + chunk])
        if realtime:
            await asyncio.sleep(max(0.0, first + (i + 1) * 0.04 - time.monotonic()))
    await speech.end_segment()
    return first


async def opened(url: str, fps: int, **options):
    session = await AvatarSession.open(url, fps=fps, **options)
    watch = Watch(await session.watch())
    await asyncio.sleep(1.5)
    return session, watch, await session.speech(16000)


# -- 1. speech start -------------------------------------------------------------------------
async def speech_start(url: str, fps: int, segments: int, realtime: bool) -> dict:
    session, watch, speech = await opened(url, fps)
    pcm, latencies, server = speech_pcm(2.0), [], []
    try:
        idle = watch.idle_picture()
        for _ in range(segments):
            sent = await send(speech, pcm, realtime)
            await speech.event("speech_finished")
            latencies.append((watch.first_speech_frame(idle, sent) or sent) - sent)
            await asyncio.sleep(1.0)
        server = (await session.status())["latency_ms"]["speech_start"]
    finally:
        watch.stop()
        await session.close()
    return {"pace": "real time (40 ms chunks)" if realtime else "TTS (all at once)", "fps": fps,
            **percentiles(latencies), "server_p50_ms": server.get("p50"), "server_p95_ms": server.get("p95")}


# -- 2. interrupts ---------------------------------------------------------------------------
async def interrupts(url: str, fps: int, count: int) -> dict:
    session, watch, speech = await opened(url, fps, silence_dbfs=None)
    pcm, to_change, to_idle = speech_pcm(6.0), [], []
    try:
        idle = watch.idle_picture()
        for _ in range(count):
            sent = await send(speech, pcm, realtime=False)
            await speech.event("speech_started")
            await asyncio.sleep(0.8)
            interrupted = time.monotonic()
            await speech.interrupt()
            await speech.event("speech_finished")
            await asyncio.sleep(1.0)
            strength = [(blocks_changed(picture, idle), at) for picture, at in watch.video if at >= sent]
            speaking = [change for change, at in strength if at < interrupted and change > SPEECH_CHANGE]
            if not speaking:
                continue
            # the fade out's first frame: the face weaker than any speech frame showed it
            weaker = 0.9 * float(np.median(speaking))
            fade = next((at for change, at in strength if at >= interrupted and change < weaker), None)
            to_change.append((fade or interrupted) - interrupted)
            to_idle.append((watch.first_idle_frame(idle, interrupted) or interrupted) - interrupted)
        server = (await session.status())["latency_ms"]["interrupt"]
    finally:
        watch.stop()
        await session.close()
    return {"fps": fps, "to_fade_start": percentiles(to_change), "to_own_face": percentiles(to_idle),
            "server_p50_ms": server.get("p50"), "server_p95_ms": server.get("p95")}


# -- 3. A/V offset and drift -----------------------------------------------------------------
async def av_drift(url: str, fps: int, minutes: float) -> dict:
    session, watch, speech = await opened(url, fps, silence_dbfs=None)
    pcm, rows = speech_pcm(2.0), []
    started = time.monotonic()
    try:
        idle = watch.idle_picture()
        while time.monotonic() - started < minutes * 60:
            sent = await send(speech, pcm, realtime=False)
            await speech.event("speech_finished")
            frame, onset = watch.first_speech_frame(idle, sent), watch.audio_onset(sent)
            if frame and onset:
                rows.append((time.monotonic() - started, frame - onset))
            cut = len(watch.video) - 10 * fps  # memory: keep the last seconds
            if cut > 0:
                del watch.video[:cut]
                del watch.audio[: max(0, len(watch.audio) - 500)]
            await asyncio.sleep(4.0)
        status = await session.status()
    finally:
        watch.stop()
        await session.close()
    offsets = np.array([o for _, o in rows]) * 1000
    times = np.array([t for t, _ in rows])
    slope = float(np.polyfit(times / 60, offsets, 1)[0]) if len(rows) > 2 else None
    fifth = max(1, len(offsets) // 5)

    def ms(value) -> float:
        return round(float(value), 1)

    return {"fps": fps, "minutes": round(float(times[-1] / 60), 1) if len(times) else 0, "segments": len(rows),
            "offset_mean_ms": ms(offsets.mean()), "offset_abs_max_ms": ms(np.abs(offsets).max()),
            "offset_first_fifth_ms": ms(offsets[:fifth].mean()), "offset_last_fifth_ms": ms(offsets[-fifth:].mean()),
            "drift_ms_per_minute": round(slope, 2) if slope is not None else None,
            "clock_rebased": status["clock_rebased"], "frames": status["frames"], "triton": status["triton"]}


# -- 4. sessions at once ---------------------------------------------------------------------
def frontend_cpu(pid: int | None) -> float:
    return sum(psutil.Process(pid).cpu_times()[:2]) if pid else 0.0


async def idle_sessions(url: str, count: int, pid: int | None, seconds: float = 20.0) -> dict:
    sessions, watches = [], []
    try:
        for _ in range(count):
            session = await AvatarSession.open(url, fps=25)
            sessions.append(session)
            watches.append(Watch(await session.watch(), keep_video=False))
        await asyncio.sleep(5.0)  # idle cycles encoded, replay started
        losses = await picture_losses(url)
        cpu, started, frames = frontend_cpu(pid), time.monotonic(), [len(w.video) for w in watches]
        await asyncio.sleep(seconds)
        elapsed = time.monotonic() - started
        used = (frontend_cpu(pid) - cpu) / elapsed
        rates = [(len(w.video) - n) / elapsed for w, n in zip(watches, frames)]
        losses = {k: v - losses.get(k, 0) for k, v in (await picture_losses(url)).items()}
    finally:
        for watch in watches:
            watch.stop()
        for session in sessions:
            await session.close()
    return {"sessions": count, "frontend_cpu_percent_of_one_core": round(used * 100, 1),
            "per_session_percent": round(used * 100 / count, 2), "frames_per_second_min": round(min(rates), 1),
            "frames_per_second_mean": round(float(np.mean(rates)), 1), "picture_loss_reports": losses}


async def speaking_sessions(url: str, count: int, fps: int, seconds: float = 8.0) -> dict:
    opened_sessions = [await opened(url, fps, silence_dbfs=None) for _ in range(count)]
    pcm = speech_pcm(seconds)
    try:
        await asyncio.gather(*(send(speech, pcm, realtime=False) for _, _, speech in opened_sessions))
        await asyncio.gather(*(speech.event("speech_finished", timeout=300) for _, _, speech in opened_sessions))
        statuses = [await session.status() for session, _, _ in opened_sessions]
    finally:
        for session, watch, _ in opened_sessions:
            watch.stop()
            await session.close()
    holds = [s["frames"]["hold"] / max(1, s["frames"]["speech"]) for s in statuses]
    return {"sessions": count, "fps": fps, "speech_seconds": seconds,
            "holds_per_speech_frame_max": round(max(holds), 3),
            "real_time": max(holds) < 0.05}


# -- 5. Triton calls saved -------------------------------------------------------------------
def musetalk_inferences(triton_http: str | None) -> int | None:
    if not triton_http:
        return None
    stats = httpx.get(f"http://{triton_http}/v2/models/musetalk/stats").json()["model_stats"][0]
    return int(stats.get("inference_count", 0))


async def calls_saved(url: str, fps: int, triton_http: str | None) -> dict:
    pcm = speech_pcm(trim=False) * 3  # 16.7 s of real speech with its pauses, as it was spoken
    async with await AvatarSession.open(url, fps=fps) as session:
        before = musetalk_inferences(triton_http)
        speech = await session.speech(16000)
        await send(speech, pcm, realtime=False)
        await speech.event("speech_finished", timeout=300)
        status = await session.status()
        after = musetalk_inferences(triton_http)
    frames, triton = status["frames"]["speech"], status["triton"]
    return {"fps": fps, "speech_frames": frames, "faces_generated": triton["faces"],
            "silent_frames_skipped": triton["silent_frames"],
            "saved_percent": round(100 * triton["silent_frames"] / frames, 1),
            "musetalk_inferences_on_triton": after - before if before is not None else None}


# -- running it ------------------------------------------------------------------------------
async def measure(args, url: str, triton_http: str | None, pid: int | None) -> dict:
    results = {}
    warm = await AvatarSession.open(url, fps=25)  # the idle cycle, and the libraries, once
    await warm.close()
    results["speech_start"] = [await speech_start(url, 25, args.segments, realtime) for realtime in (False, True)]
    print("speech start:", results["speech_start"], flush=True)
    results["interrupts"] = await interrupts(url, 25, args.segments)
    print("interrupts:", results["interrupts"], flush=True)
    results["calls_saved"] = await calls_saved(url, 25, triton_http)
    print("calls saved:", results["calls_saved"], flush=True)
    results["idle_sessions"] = [await idle_sessions(url, n, pid) for n in map(int, args.idle.split(","))]
    print("idle sessions:", results["idle_sessions"], flush=True)
    results["speaking_sessions"] = [await speaking_sessions(url, n, fps) for n, fps in ((1, 25), (1, 12), (2, 12))]
    print("speaking sessions:", results["speaking_sessions"], flush=True)
    results["av_drift"] = await av_drift(url, 25, args.drift_minutes)
    print("A/V:", results["av_drift"], flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.conversation", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", choices=["tiny", "full"], default="tiny")
    p.add_argument("--url", help="a running front end (default: start the local stack)")
    p.add_argument("--triton-http", help="its Triton's HTTP host:port (Triton's own counts)")
    p.add_argument("--segments", type=int, default=10, help="segments per latency figure")
    p.add_argument("--idle", default="1,4,16", help="idle sessions at once")
    p.add_argument("--drift-minutes", type=float, default=10.0)
    p.add_argument("--label", help="results file name (default: the profile, _cpu)")
    args = p.parse_args(argv)
    server = frontend = None
    url, triton_http, pid = args.url, args.triton_http, None
    if not url:
        server, frontend = local_stack(args.profile, {"MUSETALK_MAX_LIVE_SESSIONS": "32"})
        url, triton_http, pid = frontend.url, server.http_url, frontend.process.pid
    try:
        results = asyncio.run(measure(args, url, triton_http, pid))
    finally:
        if frontend:
            frontend.stop()
        if server:
            server.stop()
    write(args, argv, results)
    return 0


def write(args, argv, r: dict) -> None:
    label = args.label or f"{args.profile}_cpu"
    out = RESULTS / f"conversation_{label}.md"
    lines = [f"# Conversational sessions ({args.profile} profile)", "",
             f"- produced by: `{invocation('benchmarks.conversation', argv)}`", f"- machine: {machine()}",
             f"- date: {time.strftime('%Y-%m-%d')}", "- random weights: real timings, no lip sync",
             "- measured at an aiortc WebRTC receiver on the same machine; arrival = a frame's first RTP packet", "",
             "## Speech start: first PCM byte sent -> first speech frame received", "",
             "| pace | fps | segments | p50 ms | p95 ms | max ms | server p50 ms | server p95 ms |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {s['pace']} | {s['fps']} | {s['count']} | {s.get('p50_ms')} | {s.get('p95_ms')} | "
              f"{s.get('max_ms')} | {s['server_p50_ms']} | {s['server_p95_ms']} |" for s in r["speech_start"]]
    i = r["interrupts"]
    lines += ["", "## Interrupt: sent -> received", "",
              "| fps | to the fade out's first frame p50 / p95 ms | to the avatar's own face p50 / p95 ms "
              "| server (to the first frame not speech) p50 / p95 ms |", "|---|---|---|---|",
              f"| {i['fps']} | {i['to_fade_start'].get('p50_ms')} / {i['to_fade_start'].get('p95_ms')} | "
              f"{i['to_own_face'].get('p50_ms')} / {i['to_own_face'].get('p95_ms')} | "
              f"{i['server_p50_ms']} / {i['server_p95_ms']} |"]
    a = r["av_drift"]
    lines += ["", f"## A/V offset over a {a['minutes']} min session ({a['segments']} segments, {a['fps']} fps)", "",
              "First speech frame's arrival minus its audio's first arrival (positive: video later).", "",
              "| mean ms | max abs ms | first fifth mean ms | last fifth mean ms | drift ms/min | clock rebased |",
              "|---|---|---|---|---|---|",
              f"| {a['offset_mean_ms']} | {a['offset_abs_max_ms']} | {a['offset_first_fifth_ms']} | "
              f"{a['offset_last_fifth_ms']} | {a['drift_ms_per_minute']} | {a['clock_rebased']} |", "",
              f"Frames of that session: {a['frames']}; Triton: {a['triton']}."]
    lines += ["", "## Idle sessions, each watched by one viewer (25 fps)", "",
              "| sessions | front end CPU, % of one core | per session % | frames/s min | mean | viewers' "
              "keyframe requests (by answer) |", "|---|---|---|---|---|---|"]
    lines += [f"| {s['sessions']} | {s['frontend_cpu_percent_of_one_core']} | {s['per_session_percent']} | "
              f"{s['frames_per_second_min']} | {s['frames_per_second_mean']} | "
              f"{s.get('picture_loss_reports') or 'none'} |" for s in r["idle_sessions"]]
    lines += ["", "## Speaking sessions at once (TTS-paced speech)", "",
              "| sessions | fps | speech s | holds per speech frame (worst) | real time |", "|---|---|---|---|---|"]
    lines += [f"| {s['sessions']} | {s['fps']} | {s['speech_seconds']} | {s['holds_per_speech_frame_max']} | "
              f"{'yes' if s['real_time'] else 'no'} |" for s in r["speaking_sessions"]]
    c = r["calls_saved"]
    lines += ["", "## Triton calls saved on real speech (16.7 s, the default silence threshold)", "",
              "| fps | speech frames | faces generated | silent frames (no call) | saved | musetalk inferences on "
              "Triton |", "|---|---|---|---|---|---|",
              f"| {c['fps']} | {c['speech_frames']} | {c['faces_generated']} | {c['silent_frames_skipped']} | "
              f"{c['saved_percent']}% | {c['musetalk_inferences_on_triton']} |"]
    print(f"results: {publish(out, lines, r)}")


if __name__ == "__main__":
    raise SystemExit(main())
