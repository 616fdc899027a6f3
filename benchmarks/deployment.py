"""Sessions across real networks and deployments, measured at real WebRTC receivers, in one run.

    python -m benchmarks.deployment                   # tiny models: Triton, coturn, nginx, two replicas

The stack: the local Triton; two front-end replicas that forward each other's sessions
(MUSETALK_REPLICA_URL) behind nginx (round robin, no cookie); coturn, from which every
session mints short-lived credentials. Then:

1. Speech start through the TURN relay (a relay-only aiortc viewer) beside loopback (host
   candidates): first PCM byte sent -> first speech frame received.
2. The agent path beside the direct session: Pipecat's MuseTalkVideoService in a real pipeline
   (the first TTS audio frame queued -> the first generated face it pushes downstream; an
   InterruptionFrame -> its last generated face) against the same speech sent straight to a
   session (first PCM byte -> first speech frame at a receiver; interrupt -> the face gone).
3. A replica drained (SIGTERM): going_away -> the SDK's session_moved (a new session on the
   other replica), and the longest gap in the viewer's frames around the move.
4. Triton killed mid-speech and started again: Triton ready -> the front end ready -> the next
   segment's first speech frame.

Random weights: real timings, no lip sync.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import httpx
import numpy as np
import soundfile

from benchmarks.conversation import opened, percentiles, send, speech_pcm
from benchmarks.provenance import invocation, machine, publish
from client.sessions import AvatarSession
from stack.balancer import LocalBalancer
from stack.exports import ensure_exported
from stack.frontend_process import FrontEnd
from stack.serve import default_avatar_source
from stack.turn import LocalTurn
from stack.viewing import Watch
from triton_local.launch import start as start_triton
from triton_local.processes import free_port
from triton_local.server import BUILD, Ports

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parent.parent
PIPECAT_PYTHON = ROOT / ".venv-pipecat" / "bin" / "python"
DRIVER = Path(__file__).with_name("pipecat_driver.py")
FPS = 25


class Stack:
    """Triton, coturn, two replicas and nginx, started and stopped together."""

    def __init__(self, drain_s: float):
        self.drain_s = drain_s
        self.folder = BUILD / "deployment"
        self.triton = self.turn = self.balancer = None
        self.replicas: list[FrontEnd] = []
        self.ports = [free_port(), free_port()]

    def __enter__(self) -> Stack:
        repository = ensure_exported("tiny")
        self.triton = start_triton(repository, Ports.free(), self.folder / "triton_repository", progress=False)
        self.turn = LocalTurn(folder=self.folder / "turn").start()
        self.replicas = [self.replica(i) for i in range(2)]
        for replica in self.replicas:
            assert replica.wait_until_ready(300), f"not ready; see {replica.log_file}"
        self.balancer = LocalBalancer([f"127.0.0.1:{p}" for p in self.ports], folder=self.folder / "nginx").start()
        return self

    def replica(self, index: int) -> FrontEnd:
        port = self.ports[index]
        env = {"MUSETALK_AVATAR_DIR": str(self.folder / "avatars"), "MUSETALK_REPLICA_URL": f"http://127.0.0.1:{port}",
               "MUSETALK_TURN_URLS": f'["{self.turn.url}"]', "MUSETALK_TURN_SECRET": self.turn.secret,
               "MUSETALK_ICE_SERVERS": f'[{{"urls": "stun:127.0.0.1:{self.turn.port}"}}]',
               "MUSETALK_DRAIN_SECONDS": str(self.drain_s), "MUSETALK_MAX_LIVE_SESSIONS": "32"}
        if index == 0:
            env["MUSETALK_DEFAULT_AVATAR_SOURCE"] = default_avatar_source()
        return FrontEnd(self.triton.grpc_url, port, env=env, host="127.0.0.1",
                        log_file=self.folder / f"replica-{index}.log").start()

    def holder(self, session_id: str) -> int:
        for i, replica in enumerate(self.replicas):
            if session_id in [s["id"] for s in httpx.get(f"{replica.url}/sessions").json()["sessions"]]:
                return i
        raise LookupError(session_id)

    def __exit__(self, *exc) -> None:
        for part in (self.balancer, *self.replicas, self.turn, self.triton):
            if part is not None:
                part.stop()


# -- 1. through the relay ----------------------------------------------------------------------
async def speech_start(url: str, segments: int, relay_only: bool) -> dict:
    session, watch, speech = await opened(url, FPS, relay_only=relay_only)
    pcm, latencies, decoded = speech_pcm(2.0), [], []
    try:
        idle = watch.idle_picture()
        for _ in range(segments):
            sent = await send(speech, pcm, realtime=False)
            await speech.event("speech_finished")
            latencies.append((watch.first_speech_frame(idle, sent) or sent) - sent)
            decoded.append((watch.first_speech_frame(idle, sent, decoded=True) or sent) - sent)
            await asyncio.sleep(1.0)
    finally:
        watch.stop()
        await session.close()
    return {"path": "TURN relay only (coturn)" if relay_only else "loopback (host candidates)",
            **percentiles(latencies), "decoded": percentiles(decoded)}


# -- 2. the agent path -----------------------------------------------------------------------
def agent_path(url: str, turns: int) -> dict:
    """The Pipecat service's turns, speaking exactly what the direct session speaks (the same
    2 s of trimmed speech: a softer onset would show the first face later, and say nothing of
    the path)."""
    if not PIPECAT_PYTHON.exists():
        return {"error": "no Pipecat environment: make pipecat-env"}
    speech = BUILD / "deployment" / "speech_2s.wav"
    speech.parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(str(speech), np.frombuffer(speech_pcm(2.0), "<i2"), 16000)
    out = subprocess.run([str(PIPECAT_PYTHON), str(DRIVER), "turns", "--url", url, "--speech", str(speech),
                          "--fps", str(FPS), "--turns", str(turns), "--interrupts", str(max(3, turns // 2))],
                         capture_output=True, text=True, cwd=ROOT, timeout=900)
    if out.returncode:
        return {"error": out.stderr[-2000:]}
    report = json.loads(out.stdout.strip().splitlines()[-1])
    return {"speech_start": percentiles(report["speech_start"]),
            "interrupt_to_last_face": percentiles(report["interrupt_to_last_face"]),
            **{stage: percentiles(report[stage]) for stage in ("pcm_sent", "face_arrived", "face_decoded")},
            "turns": len(report["speech_start"])}


async def direct_interrupts(url: str, count: int) -> dict:
    session, watch, speech = await opened(url, FPS, silence_dbfs=None)
    pcm, to_idle = speech_pcm(6.0), []
    try:
        idle = watch.idle_picture()
        for _ in range(count):
            await send(speech, pcm, realtime=False)
            await speech.event("speech_started")
            await asyncio.sleep(0.8)
            interrupted = time.monotonic()
            await speech.interrupt()
            await speech.event("speech_finished")
            await asyncio.sleep(1.0)
            to_idle.append((watch.first_idle_frame(idle, interrupted) or interrupted) - interrupted)
    finally:
        watch.stop()
        await session.close()
    return percentiles(to_idle)


# -- 3. a drain ---------------------------------------------------------------------------------
async def drain(stack: Stack) -> dict:
    session = await AvatarSession.open(stack.balancer.url, fps=FPS)
    watch = Watch(await session.watch(), keep_video=False)
    speech = await session.speech(16000)
    await asyncio.sleep(2.0)
    index = stack.holder(session.id)
    signalled = time.monotonic()
    stack.replicas[index].process.send_signal(signal.SIGTERM)
    going = await speech.event("going_away", timeout=20)
    moved = await speech.event("session_moved", timeout=60)
    await asyncio.sleep(3.0)
    arrivals = [at for _, at in watch.video if at >= signalled - 1]
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]
    watch.stop()
    await session.close()
    stack.replicas[index].process.wait(stack.drain_s + 30)
    stopped = time.monotonic() - signalled
    stack.replicas[index] = stack.replica(index)  # a new pod, as the rollout would start
    stack.replicas[index].wait_until_ready(300)
    return {"going_away_after_ms": round((going["received"] - signalled) * 1000, 1),
            "moved_after_ms": round((moved["received"] - signalled) * 1000, 1),
            "move_took_ms": round(moved["seconds"] * 1000, 1),
            "longest_frame_gap_ms": round(max(gaps) * 1000, 1) if gaps else None,
            "replica_exited_after_s": round(stopped, 1)}


# -- 4. Triton restarted ----------------------------------------------------------------------
async def triton_restart(stack: Stack) -> dict:
    session, watch, speech = await opened(stack.replicas[0].url, FPS, silence_dbfs=None, follow=False)
    try:
        idle = watch.idle_picture()
        await send(speech, speech_pcm(20.0), realtime=False)
        await speech.event("speech_started")
        killed = time.monotonic()
        await asyncio.to_thread(stack.triton.stop)
        error = await speech.event("error", timeout=30)
        await speech.event("speech_finished", timeout=30)  # the segment in flight, ended
        await asyncio.to_thread(stack.triton.start, 300)
        back = time.monotonic()
        while httpx.get(f"{stack.replicas[0].url}/readyz").status_code != 200:
            await asyncio.sleep(0.05)
        ready = time.monotonic()
        while not speech.events.empty():  # what the failed segment said: not this one's
            speech.events.get_nowait()
        sent = await send(speech, speech_pcm(2.0), realtime=False)
        started = await speech.event("speech_started", timeout=60)
        assert started["type"] == "speech_started", started
        await speech.event("speech_finished", timeout=60)
        first = watch.first_speech_frame(idle, sent)
    finally:
        watch.stop()
        await session.close()
    return {"error_event_after_kill_ms": round((error["received"] - killed) * 1000, 1),
            "frontend_ready_after_triton_ms": round((ready - back) * 1000, 1),
            "speech_start_after_restart_ms": round(((first or sent) - sent) * 1000, 1),
            "speaking_again_after_triton_ready_ms": round(((first or sent) - back) * 1000, 1)}


async def measure(stack: Stack, args) -> dict:
    url = stack.balancer.url
    warm = await AvatarSession.open(url, fps=FPS)
    await warm.close()
    results = {"speech_start": [await speech_start(url, args.segments, relay) for relay in (False, True)]}
    print("speech start:", results["speech_start"], flush=True)
    results["direct"] = {"speech_start": results["speech_start"][0],
                         "interrupt_to_own_face": await direct_interrupts(url, args.segments)}
    results["agent"] = await asyncio.to_thread(agent_path, url, args.segments)
    print("agent path:", results["agent"], "direct:", results["direct"], flush=True)
    results["drain"] = await drain(stack)
    print("drain:", results["drain"], flush=True)
    results["triton_restart"] = await triton_restart(stack)
    print("Triton restart:", results["triton_restart"], flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.deployment", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--segments", type=int, default=8, help="segments (and agent turns) per latency figure")
    p.add_argument("--drain-seconds", type=float, default=10.0)
    p.add_argument("--label", default="tiny_cpu")
    args = p.parse_args(argv)
    os.environ.pop("MUSETALK_CPU_CAPABILITIES", None)
    with Stack(args.drain_seconds) as stack:
        results = asyncio.run(measure(stack, args))
    write(args, argv, results)
    return 0


def write(args, argv, r: dict) -> None:
    out = RESULTS / f"deployment_{args.label}.md"
    rows = r["speech_start"]
    agent, direct = r["agent"], r["direct"]
    lines = ["# Sessions across networks and deployments (tiny models)", "",
             f"- produced by: `{invocation('benchmarks.deployment', argv)}`", f"- machine: {machine()}",
             f"- date: {time.strftime('%Y-%m-%d')}; random weights: real timings, no lip sync; {FPS} fps",
             "- two replicas behind nginx (round robin, no cookie), coturn on loopback, receivers on the same machine",
             "", "## Speech start: first PCM byte sent -> first speech frame received", "",
             "| path | segments | p50 ms | p95 ms | max ms |", "|---|---|---|---|---|"]
    lines += [f"| {s['path']} | {s['count']} | {s.get('p50_ms')} | {s.get('p95_ms')} | {s.get('max_ms')} |"
              for s in rows]
    lines += ["", "The same frames, when they came out of the receiver decoded (its jitter buffer holds a frame): "
              + "; ".join(f"{s['path']} p50 {s['decoded'].get('p50_ms')} ms, p95 {s['decoded'].get('p95_ms')} ms"
                          for s in rows) + "."]
    lines += ["", "## The agent path (Pipecat) beside the direct session", ""]
    if "error" in agent:
        lines += [f"Pipecat path not measured: {agent['error']}"]
    else:
        a, d = agent["speech_start"], direct["speech_start"]
        ai, di = agent["interrupt_to_last_face"], direct["interrupt_to_own_face"]
        lines += ["| | speech start p50 / p95 ms | interrupt p50 / p95 ms |", "|---|---|---|",
                  f"| direct session (PCM -> first speech frame at a receiver; interrupt -> own face) | "
                  f"{d.get('p50_ms')} / {d.get('p95_ms')} | {di.get('p50_ms')} / {di.get('p95_ms')} |",
                  f"| Pipecat service (TTS audio queued -> first face pushed; interruption -> last face) | "
                  f"{a.get('p50_ms')} / {a.get('p95_ms')} | {ai.get('p50_ms')} / {ai.get('p95_ms')} |",
                  "", "Where the agent path's time goes, p50 / p95 ms after the turn's first TTS frame was queued: "
                  "its first PCM on the speech socket "
                  f"{agent['pcm_sent'].get('p50_ms')} / {agent['pcm_sent'].get('p95_ms')}; the first face's first "
                  f"packet at the service's receiver {agent['face_arrived'].get('p50_ms')} / "
                  f"{agent['face_arrived'].get('p95_ms')}; that face decoded and taken by the service "
                  f"{agent['face_decoded'].get('p50_ms')} / {agent['face_decoded'].get('p95_ms')}; pushed "
                  f"downstream {a.get('p50_ms')} / {a.get('p95_ms')}. The direct session's first speech frame, "
                  f"decoded at its receiver: {d['decoded'].get('p50_ms')} / {d['decoded'].get('p95_ms')}."]
    dr, tr = r["drain"], r["triton_restart"]
    lines += ["", "## A replica drained (SIGTERM)", "",
              "| going_away after | session_moved after | the move itself | longest gap in the frames | "
              "replica exited after |", "|---|---|---|---|---|",
              f"| {dr['going_away_after_ms']} ms | {dr['moved_after_ms']} ms | {dr['move_took_ms']} ms | "
              f"{dr['longest_frame_gap_ms']} ms | {dr['replica_exited_after_s']} s |",
              "", "## Triton killed mid-speech and started again", "",
              "| error event after the kill | front end ready after Triton | speech start of the next segment | "
              "speaking again after Triton was ready |", "|---|---|---|---|",
              f"| {tr['error_event_after_kill_ms']} ms | {tr['frontend_ready_after_triton_ms']} ms | "
              f"{tr['speech_start_after_restart_ms']} ms | {tr['speaking_again_after_triton_ready_ms']} ms |"]
    print(f"results: {publish(out, lines, r)}")


if __name__ == "__main__":
    raise SystemExit(main())
