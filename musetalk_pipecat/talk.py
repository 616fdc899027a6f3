"""Talk to the avatar, with no cloud account: a Pipecat bot that says back what you say.

    python -m musetalk_pipecat.talk --frontend http://localhost:8080      # then open http://localhost:7860/
    make talk PROFILE=tiny                                                # the stack and this bot

The bot listens over Pipecat's SmallWebRTC transport (its page and offer endpoint are served
here: Pipecat's prebuilt page loads code from the internet), cuts your turns with Silero VAD
(its model ships in Pipecat's wheel),
and gives each turn's audio to the avatar as its speech: the avatar repeats what you said, in
your voice. A real agent puts speech recognition, a language model and a TTS where `EchoTurns`
is (the README shows how). With random weights (a `--synthetic` export) the mouth is noise.
"""
from __future__ import annotations

import argparse
import asyncio
from contextlib import asynccontextmanager
from importlib.resources import files
from pathlib import Path

import uvicorn
from fastapi import FastAPI
from fastapi.responses import FileResponse
from pipecat.audio.vad.silero import SileroVADAnalyzer
from pipecat.frames.frames import (
    Frame,
    InputAudioRawFrame,
    TTSAudioRawFrame,
    TTSStartedFrame,
    TTSStoppedFrame,
    VADUserStartedSpeakingFrame,
    VADUserStoppedSpeakingFrame,
)
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineWorker
from pipecat.processors.audio.vad_processor import VADProcessor
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.transports.base_transport import TransportParams
from pipecat.transports.smallwebrtc.request_handler import (
    SmallWebRTCPatchRequest,
    SmallWebRTCRequest,
    SmallWebRTCRequestHandler,
)
from pipecat.transports.smallwebrtc.transport import SmallWebRTCTransport
from pipecat.workers.runner import WorkerRunner

from musetalk_pipecat.service import MuseTalkVideoService

PRE_ROLL_S = 0.3  # audio kept from before the VAD heard the start of a turn (its first syllable)
PAGE = Path(str(files("musetalk_pipecat") / "static" / "index.html"))  # packaged with the service


class EchoTurns(FrameProcessor):
    """Each of the user's turns (between the VAD's start and stop), said back as TTS audio."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.turn: list[InputAudioRawFrame] | None = None
        self.recent: list[InputAudioRawFrame] = []

    async def process_frame(self, frame: Frame, direction: FrameDirection):
        await super().process_frame(frame, direction)
        if isinstance(frame, InputAudioRawFrame):
            if self.turn is not None:
                self.turn.append(frame)
            else:
                self.recent = [*self.recent, frame][-self._frames(frame, PRE_ROLL_S):]
            return  # the user's audio is not the bot's output
        if isinstance(frame, VADUserStartedSpeakingFrame):
            self.turn = list(self.recent)
        elif isinstance(frame, VADUserStoppedSpeakingFrame) and self.turn:
            turn, self.turn = self.turn, None
            await self.push_frame(TTSStartedFrame())
            for audio in turn:
                await self.push_frame(TTSAudioRawFrame(audio=audio.audio, sample_rate=audio.sample_rate,
                                                       num_channels=audio.num_channels))
            await self.push_frame(TTSStoppedFrame())
        await self.push_frame(frame, direction)

    @staticmethod
    def _frames(frame: InputAudioRawFrame, seconds: float) -> int:
        return max(1, round(seconds * frame.sample_rate / max(1, frame.num_frames)))


def transport_params(width: int = 512, height: int = 512, fps: int = 25) -> TransportParams:
    return TransportParams(audio_in_enabled=True, audio_out_enabled=True, video_out_enabled=True,
                           video_out_is_live=True, video_out_width=width, video_out_height=height,
                           video_out_framerate=fps)


async def run_bot(connection, service: MuseTalkVideoService, width: int, height: int) -> None:
    """One bot for one browser's connection, until it leaves."""
    transport = SmallWebRTCTransport(webrtc_connection=connection,
                                     params=transport_params(width, height, service.fps))
    pipeline = Pipeline([
        transport.input(),
        VADProcessor(vad_analyzer=SileroVADAnalyzer()),
        EchoTurns(),
        service,
        transport.output(),
    ])
    worker = PipelineWorker(pipeline, idle_timeout_secs=None)

    @transport.event_handler("on_client_disconnected")
    async def on_client_disconnected(transport, client):
        await worker.cancel()

    runner = WorkerRunner(handle_sigint=False)
    await runner.add_workers(worker)
    await runner.run()


def app(frontend: str, avatar: str | None, fps: int, width: int, height: int) -> FastAPI:
    """The bot's page (GET /, nothing from other hosts: Pipecat's prebuilt page fetches Daily's
    code from the internet) and the SmallWebRTC offer endpoint it talks to."""
    handler = SmallWebRTCRequestHandler()
    bots: dict[asyncio.Task, MuseTalkVideoService] = {}

    @asynccontextmanager
    async def lifespan(api: FastAPI):
        yield
        for service in list(bots.values()):  # stopping: the avatars' sessions end with the bots
            await service.close_session()

    api = FastAPI(title="Talk to the avatar", lifespan=lifespan)

    @api.get("/", include_in_schema=False)
    async def page():
        return FileResponse(PAGE, headers={"Cache-Control": "no-cache"})

    @api.post("/api/offer")
    async def offer(request: SmallWebRTCRequest):
        async def start(connection) -> None:
            service = MuseTalkVideoService(url=frontend, avatar_id=avatar, fps=fps)
            task = asyncio.create_task(run_bot(connection, service, width, height))
            bots[task] = service
            task.add_done_callback(lambda done: bots.pop(done, None))

        return await handler.handle_web_request(request=request, webrtc_connection_callback=start)

    @api.patch("/api/offer")
    async def ice_candidate(request: SmallWebRTCPatchRequest):
        await handler.handle_patch_request(request)
        return {"status": "success"}

    return api


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m musetalk_pipecat.talk", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frontend", default="http://localhost:8080", help="the MuseTalk front end")
    p.add_argument("--avatar", help="a prepared avatar (default: the front end's default)")
    p.add_argument("--fps", type=int, default=25)
    p.add_argument("--size", default="512x512", help="the avatar's WIDTHxHEIGHT (the video out's size)")
    p.add_argument("--host", default="localhost")
    p.add_argument("--port", type=int, default=7860)
    args = p.parse_args(argv)
    width, height = map(int, args.size.split("x"))
    print(f"talk to the avatar: http://{args.host}:{args.port}/", flush=True)
    uvicorn.run(app(args.frontend, args.avatar, args.fps, width, height), host=args.host, port=args.port)


if __name__ == "__main__":
    main()
