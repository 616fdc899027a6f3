"""POST /onnx-infer: speech in, a video of the avatar speaking it out."""
from __future__ import annotations

import json

from fastapi import APIRouter, Depends, File, Form, UploadFile
from fastapi.responses import JSONResponse, Response

from contract import specs
from frontend import audio, pipeline
from frontend.services import Services, services

router = APIRouter(tags=["generation"])


@router.post("/onnx-infer", responses={200: {"content": {"video/mp4": {}, "application/json": {}}}})
def onnx_infer(
    audio_file: UploadFile = File(..., description="speech: wav, mp3, flac, ogg, ..."),
    fps: int = Form(25, ge=1, le=60, description="frames per second of the video"),
    skip_save_images: bool = Form(False, description="generate every frame but answer "
                                  "timings as JSON instead of a video (benchmark mode)"),
    avatar_id: str | None = Form(None, description="prepared avatar (default: the configured one)"),
    batch_size: int | None = Form(None, ge=1, le=specs.MUSETALK.max_batch_size,
                                  description="frames per request to Triton"),
    s: Services = Depends(services),
):
    """Speech in, lip-synced video of the avatar out (H.264 + AAC mp4).

    Random-weight deployments (`--synthetic` exports) give real timings but
    no lip sync: the faces are noise.
    """
    avatar = s.avatar(avatar_id)
    speech = audio.decode(s.read_upload(audio_file), s.settings.max_audio_seconds)
    video, report = pipeline.generate(
        avatar, speech, fps, s.client, batch_size or s.settings.batch_size,
        s.settings.in_flight, encode=not skip_save_images, preset=s.settings.x264_preset,
    )
    headers = {"X-Frame-Count": str(report.frames), "X-Timings": json.dumps(report.as_dict())}
    if video is None:
        return JSONResponse({"avatar_id": avatar.id, **report.as_dict()}, headers=headers)
    return Response(video, media_type="video/mp4", headers=headers)
