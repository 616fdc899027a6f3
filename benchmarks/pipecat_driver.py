"""Runs MuseTalkVideoService in a real Pipecat pipeline and reports what came out, as JSON.

Run with the Pipecat environment's Python (.venv-pipecat: Pipecat's pins cannot live beside the
service's), against a real front end and a real Triton, by tests/test_pipecat.py and
benchmarks/deployment.py:

    .venv-pipecat/bin/python benchmarks/pipecat_driver.py speak --url http://127.0.0.1:8080 --speech speech.flac

    a source  ->  MuseTalkVideoService  ->  a collector (what the output transport would get)

Scenarios: `speak` (idle, then a TTS turn, then idle), `interrupt` (an InterruptionFrame in the
middle of a long turn), `frontend-gone` (the front end is killed mid-turn: --kill PID), `turns`
(--turns TTS turns, each timed from its first audio frame queued to the first generated face
pushed downstream, then one interrupted: the agent path's figures).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import soundfile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipecat.frames.frames import (  # noqa: E402
    EndFrame,
    ErrorFrame,
    Frame,
    InterruptionFrame,
    OutputImageRawFrame,
    TTSAudioRawFrame,
    TTSStartedFrame,
    TTSStoppedFrame,
)
from pipecat.pipeline.pipeline import Pipeline  # noqa: E402
from pipecat.pipeline.worker import PipelineWorker  # noqa: E402
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor  # noqa: E402
from pipecat.workers.runner import WorkerRunner  # noqa: E402

from musetalk_pipecat import MuseTalkVideoService  # noqa: E402


class Recorder(FrameProcessor):
    """Notes every frame that reaches it (with when) and passes it on."""

    def __init__(self, direction: FrameDirection, **kwargs):
        super().__init__(**kwargs)
        self.direction, self.frames = direction, []

    async def process_frame(self, frame: Frame, direction: FrameDirection):
        await super().process_frame(frame, direction)
        if direction == self.direction:
            self.frames.append((time.monotonic(), frame))
        await self.push_frame(frame, direction)


def tts_frames(path: str, repeat: int = 1) -> tuple[list[Frame], float]:
    """A TTS turn of real speech: started, 20 ms chunks of 16-bit audio, stopped."""
    samples, rate = soundfile.read(path, dtype="int16")
    samples = np.tile(samples, repeat)
    step = rate // 50
    audio = [TTSAudioRawFrame(audio=samples[i : i + step].tobytes(), sample_rate=rate, num_channels=1)
             for i in range(0, len(samples), step)]
    return [TTSStartedFrame(), *audio, TTSStoppedFrame()], len(samples) / rate


def luma(frame: OutputImageRawFrame) -> np.ndarray:
    rgb = np.frombuffer(frame.image, np.uint8).reshape(frame.size[1], frame.size[0], 3).astype(np.float32)
    return rgb @ np.array([0.299, 0.587, 0.114], np.float32)


def changed(a: np.ndarray, b: np.ndarray, block: int = 16) -> float:
    h, w = (a.shape[0] // block) * block, (a.shape[1] // block) * block
    diff = np.abs(a[:h, :w] - b[:h, :w]).reshape(h // block, block, w // block, block)
    return float(diff.mean(axis=(1, 3)).max())


async def run(args) -> dict:
    service = MuseTalkVideoService(url=args.url, fps=args.fps, reconnect_within_s=args.reconnect_within)
    upstream, downstream = Recorder(FrameDirection.UPSTREAM), Recorder(FrameDirection.DOWNSTREAM)
    worker = PipelineWorker(Pipeline([upstream, service, downstream]), idle_timeout_secs=None,
                            cancel_on_idle_timeout=False)
    started = asyncio.Event()

    @worker.event_handler("on_pipeline_started")
    async def on_started(worker, frame):
        started.set()

    runner = WorkerRunner(handle_sigint=False)
    await runner.add_workers(worker)
    running = asyncio.create_task(runner.run())
    await asyncio.wait_for(started.wait(), 60)
    await asyncio.sleep(2.0)  # idle
    report: dict = {"session": service.session.id if service.session else None}
    if args.scenario == "turns":
        report.update(await turns(worker, downstream, args, service))
        await worker.queue_frame(EndFrame())
        await asyncio.wait_for(running, 60)
        return report
    turn, seconds = tts_frames(args.speech, 3 if args.scenario == "interrupt" else 1)
    report["speech_seconds"] = seconds
    sent = time.monotonic()
    for frame in turn:
        await worker.queue_frame(frame)
    if args.scenario == "speak":
        await wait_for(lambda: any(isinstance(f, TTSStoppedFrame) for _, f in downstream.frames), seconds + 60)
        await asyncio.sleep(2.0)  # idle again
        report["status"] = httpx.get(f"{args.url}/sessions/{service.session.id}").json()
    elif args.scenario == "interrupt":
        await wait_for(lambda: any(isinstance(f, TTSStartedFrame) for _, f in downstream.frames), 60)
        await asyncio.sleep(1.5)
        report["interrupted_at"] = time.monotonic() - sent
        await worker.queue_frame(InterruptionFrame())
        await asyncio.sleep(2.0)
        report["status"] = httpx.get(f"{args.url}/sessions/{service.session.id}").json()
    elif args.scenario == "frontend-gone":
        await wait_for(lambda: any(isinstance(f, TTSStartedFrame) for _, f in downstream.frames), 60)
        os.kill(args.kill, signal.SIGKILL)
        report["killed_at"] = time.monotonic() - sent
        await wait_for(lambda: any(isinstance(f, ErrorFrame) for _, f in upstream.frames), 30)
    ending = time.monotonic()
    await worker.queue_frame(EndFrame())
    await asyncio.wait_for(running, 60)
    report["ended_in"] = time.monotonic() - ending
    return {**report, **describe(downstream.frames, upstream.frames, sent)}


async def turns(worker, downstream, args, service) -> dict:
    """Each turn: its frames queued at once (as a TTS makes them), then the time until the first
    generated face leaves the service, and where that time went (the first PCM on the speech
    socket; the first face's first RTP packet at the service's receiver; the face decoded and
    taken by the service); the last turns are interrupted while they speak, timed to the last
    generated face after the InterruptionFrame."""
    turn, seconds = tts_frames(args.speech)
    idle = None
    starts, interrupts = [], []
    stages = {"pcm_sent": [], "face_arrived": [], "face_decoded": []}
    sends, taken = [], []  # when the service sent on its speech socket; (arrived, taken, frame) it received
    send, queue = service._send, service.viewer.video

    async def noted_send(sending):
        sends.append(time.monotonic())
        await send(sending)

    get = queue.get

    async def noted_get():
        received = await get()
        taken.append((received.arrived, time.monotonic(), received.frame))
        return received

    service._send, queue.get = noted_send, noted_get
    for n in range(args.turns + args.interrupts):
        while idle is None:
            idle = next((luma(f) for _, f in downstream.frames if isinstance(f, OutputImageRawFrame)), None)
            await asyncio.sleep(0.05)
        mark, sent_mark, taken_mark = len(downstream.frames), len(sends), len(taken)
        queued = time.monotonic()
        for frame in (turn if n < args.turns else tts_frames(args.speech, 3)[0]):  # interrupted: a long turn
            await worker.queue_frame(frame)

        def first_face(mark=mark, idle=idle):
            return next((t for t, f in downstream.frames[mark:] if isinstance(f, OutputImageRawFrame)
                         and changed(luma(f), idle) > 12), None)

        def stopped(mark=mark):
            return any(isinstance(f, TTSStoppedFrame) for _, f in downstream.frames[mark:])

        await wait_for(lambda: first_face() is not None, 60)
        if n < args.turns:
            starts.append(first_face() - queued)
            face = next((a, t) for a, t, frame in taken[taken_mark:] if frame is not None
                        and changed(frame.to_ndarray(format="gray").astype(np.float32), idle) > 12)
            stages["pcm_sent"].append(sends[sent_mark] - queued)
            stages["face_arrived"].append(face[0] - queued)
            stages["face_decoded"].append(face[1] - queued)
            await wait_for(stopped, seconds + 60)
            await asyncio.sleep(1.0)
            continue
        await asyncio.sleep(0.8)
        cut = time.monotonic()
        await worker.queue_frame(InterruptionFrame())
        await asyncio.sleep(1.5)
        faces = [t for t, f in downstream.frames[mark:] if isinstance(f, OutputImageRawFrame)
                 and changed(luma(f), idle) > 12]
        interrupts.append(max([t - cut for t in faces if t >= cut], default=0.0))
        await asyncio.sleep(1.0)
    return {"speech_start": starts, "interrupt_to_last_face": interrupts, **stages}


async def wait_for(condition, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("the pipeline never got there")
        await asyncio.sleep(0.05)


def describe(down: list, up: list, sent: float) -> dict:
    images = [(t - sent, f) for t, f in down if isinstance(f, OutputImageRawFrame)]
    idle = luma(images[0][1])
    kinds = []  # per image: "idle" or "face" (the generated mouth), and whether it repeats the one before
    for k, (_, image) in enumerate(images):
        picture = luma(image)
        kinds.append({"t": round(images[k][0], 3), "face": changed(picture, idle) > 12,
                      "repeat": k > 0 and changed(picture, luma(images[k - 1][1])) <= 2,
                      "pts": image.pts})
    audio = [(t - sent, f) for t, f in down if isinstance(f, TTSAudioRawFrame)]
    return {
        "sizes": sorted({f.size for _, f in images}),
        "images": kinds,
        "audio_seconds": sum(len(f.audio) / 2 / f.sample_rate for _, f in audio),
        "audio_first": round(audio[0][0], 3) if audio else None,
        "voice_first": next((round(t, 3) for t, f in audio if np.abs(np.frombuffer(f.audio, "<i2")).max() > 600),
                            None),
        "audio_last": round(audio[-1][0], 3) if audio else None,
        "events": [(round(t - sent, 3), type(f).__name__) for t, f in down
                   if isinstance(f, (TTSStartedFrame, TTSStoppedFrame, InterruptionFrame))],
        "errors": [f.error for _, f in up if isinstance(f, ErrorFrame)],
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("scenario", choices=["speak", "interrupt", "frontend-gone", "turns"])
    p.add_argument("--url", required=True)
    p.add_argument("--speech", required=True)
    p.add_argument("--fps", type=int, default=12)
    p.add_argument("--kill", type=int, help="the front end's pid (frontend-gone)")
    p.add_argument("--turns", type=int, default=8, help="turns timed (turns)")
    p.add_argument("--interrupts", type=int, default=1, help="turns interrupted, after those (turns)")
    p.add_argument("--reconnect-within", type=float, default=60.0,
                   help="how long the service tries to move to a new session when its own goes away")
    args = p.parse_args()
    print(json.dumps(asyncio.run(run(args))))


if __name__ == "__main__":
    main()
