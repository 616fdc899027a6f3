"""MuseTalkVideoService in a Pipecat pipeline: TTS audio in, the avatar speaking it out.
(Runs in the Pipecat environment: make pipecat-env. A WAV file stands in for the TTS here.)"""
import asyncio
import os

import soundfile
from pipecat.frames.frames import EndFrame, OutputImageRawFrame, TTSAudioRawFrame, TTSStartedFrame, TTSStoppedFrame
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineWorker
from pipecat.processors.frame_processor import FrameProcessor
from pipecat.workers.runner import WorkerRunner

from musetalk_pipecat import MuseTalkVideoService

url = os.environ.get("MUSETALK_URL", "http://localhost:8080")
pcm, rate = soundfile.read(os.environ.get("MUSETALK_SPEECH", "stack/assets/demo_speech.flac"), dtype="int16")


class Count(FrameProcessor):  # where transport.output() would be: counts what it would show and play
    images = audio = 0

    async def process_frame(self, frame, direction):
        await super().process_frame(frame, direction)
        self.images += isinstance(frame, OutputImageRawFrame)
        self.audio += isinstance(frame, TTSAudioRawFrame)
        await self.push_frame(frame, direction)


async def main():
    out = Count()
    # the key: api_key=..., or $MUSETALK_API_KEY (none for a front end without keys)
    worker = PipelineWorker(Pipeline([MuseTalkVideoService(url=url, fps=25), out]), idle_timeout_secs=None)
    runner = WorkerRunner(handle_sigint=False)
    await runner.add_workers(worker)
    running = asyncio.create_task(runner.run())
    await asyncio.sleep(2)  # the avatar, idle
    turn = [TTSAudioRawFrame(pcm[i : i + rate // 50].tobytes(), rate, 1) for i in range(0, len(pcm), rate // 50)]
    for frame in [TTSStartedFrame(), *turn, TTSStoppedFrame()]:
        await worker.queue_frame(frame)
    await asyncio.sleep(len(pcm) / rate + 4)
    await worker.queue_frame(EndFrame())
    await running
    print(f"{out.images} images and {out.audio} audio frames out")


asyncio.run(main())
