"""POST /onnx-infer: speech in, a video of the avatar speaking it out, whole or streamed."""
from __future__ import annotations

import json
from collections.abc import Iterator

from fastapi import APIRouter, Depends, File, Form, UploadFile
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from contract import specs
from frontend.access import Caller
from frontend.generation import answers
from frontend.routes.auth import key_holder
from frontend.services import Services, services
from frontend.speech import audio

router = APIRouter(tags=["generation"])


class ClosingStream(StreamingResponse):
    """A streamed answer that always closes its body when it ends, so the generation of a
    client that left stops at once (batches not started are cancelled, encoders closed),
    not whenever the garbage collector gets to it."""

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()


async def _body(first: bytes, chunks: Iterator[bytes]):
    """The generation's chunks, each made on a worker thread (it blocks on Triton)."""
    try:
        yield first
        while (chunk := await run_in_threadpool(next, chunks, None)) is not None:
            yield chunk
    finally:
        await run_in_threadpool(chunks.close)


@router.post("/onnx-infer", responses={200: {"content": {"video/mp4": {}, "application/json": {}}}})
def onnx_infer(
    audio_file: UploadFile = File(..., description="speech: wav, mp3, flac, ogg, ..."),
    fps: int = Form(25, ge=1, le=60, description="frames per second of the video"),
    skip_save_images: bool = Form(False, description="generate every frame but answer "
                                  "timings as JSON instead of a video (benchmark mode)"),
    avatar_id: str | None = Form(None, description="prepared avatar (default: the configured one)"),
    batch_size: int | None = Form(None, ge=1, le=specs.MUSETALK.max_batch_size,
                                  description="frames per request to Triton"),
    stream: bool = Form(False, description="answer fragmented MP4 while the frames are made "
                        "(chunked): a <video> element or ffplay starts before the clip is finished"),
    s: Services = Depends(services),
    caller: Caller = Depends(key_holder),
):
    """Speech in, lip-synced video of the avatar out (H.264 + AAC mp4).

    With `stream=true` the body is fragmented MP4 sent as it is made; it ends with
    a `free` box holding `musetalk:{"status": "done" | "error", ...}` (players skip
    it): a stream without it was cut short. Random-weight deployments (`--synthetic`
    exports) give real timings but no lip sync: the faces are noise.
    """
    avatar = s.avatar(avatar_id, caller)
    speech = audio.decode(s.read_upload(audio_file), s.settings.max_audio_seconds)
    batch = batch_size or s.settings.batch_size
    frames = audio.frame_count(speech.seconds, fps)  # what it costs: admission counts frames
    if stream and not skip_save_images:
        s.generations.acquire(frames, caller.tenant)  # released by the stream when it ends, however it ends
        chunks = answers.stream(avatar, speech, fps, s.client, batch, s.settings.in_flight,
                                s.settings.x264_preset, on_end=lambda: s.generations.release(frames, caller.tenant),
                                live_first=s.live_first)
        first = next(chunks)  # errors before the first byte are the usual JSON answers
        return ClosingStream(_body(first, chunks), media_type="video/mp4",
                             headers={"X-Frame-Count": str(frames), "Cache-Control": "no-store"})
    with s.generations.admit(frames, caller.tenant):
        video, report = answers.generate(
            avatar, speech, fps, s.client, batch, s.settings.in_flight,
            encode=not skip_save_images, preset=s.settings.x264_preset, live_first=s.live_first,
        )
    headers = {"X-Frame-Count": str(report.frames), "X-Timings": json.dumps(report.as_dict())}
    if video is None:
        return JSONResponse({"avatar_id": avatar.name, **report.as_dict()}, headers=headers)
    return Response(video, media_type="video/mp4", headers=headers)
