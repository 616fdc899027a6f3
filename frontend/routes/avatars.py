"""Avatars: prepare one from a photo or a video (a job, with progress), list, look up, delete."""
from __future__ import annotations

from fastapi import APIRouter, Depends, File, Form, UploadFile
from fastapi.responses import JSONResponse

from frontend.avatars import store as avatars
from frontend.errors import error_response
from frontend.services import Services, services

router = APIRouter(prefix="/avatars", tags=["avatars"])


@router.post("", status_code=201, responses={202: {"description": "being prepared: follow the Location"}})
def create_avatar(
    file: UploadFile = File(..., description="an image or a video of one face (the first "
                            "MUSETALK_MAX_AVATAR_SECONDS are used)"),
    avatar_id: str = Form(..., description="1-64 letters, digits, '_' or '-'"),
    bbox_shift: int = Form(0, ge=-100, le=100, description="moves the face box's top (v1.0 knob)"),
    extra_margin: int = Form(10, ge=0, le=100, description="pixels added below the chin (v1.5)"),
    s: Services = Depends(services),
):
    """Prepare an avatar: face boxes, crops, latents (Triton vae_encoder), blend masks.

    Answers 201 with the avatar when it is ready within MUSETALK_PREPARE_WAIT_SECONDS (a
    photo), else 202 with its status (`GET /avatars/{id}`: preparing, frames done / total,
    then ready or failed with the reason). `DELETE /avatars/{id}` cancels a preparation."""
    avatars.check_id(avatar_id)
    s.store.ensure_absent(avatar_id)
    data = s.read_upload(file)
    s.open_media(data)  # a bad or too large file is refused now, not in the job
    s.jobs.submit(avatar_id, data, {"bbox_shift": bbox_shift, "extra_margin": extra_margin})
    job = s.jobs.wait(avatar_id, s.settings.prepare_wait_seconds)
    if job is None:
        return s.store.load(avatar_id).meta | {"status": "ready"}
    if job["status"] == "failed":
        return error_response(job.get("http_status", 422), job["error"])
    return JSONResponse({**job, "status_url": f"/avatars/{avatar_id}"}, status_code=202,
                        headers={"Location": f"/avatars/{avatar_id}"})


@router.get("")
def list_avatars(s: Services = Depends(services)):
    """Ready avatars, and those being prepared or failed (with their `status`)."""
    return {"avatars": s.store.list() + s.jobs.list(), "default": s.settings.default_avatar}


@router.get("/{avatar_id}")
def get_avatar(avatar_id: str, s: Services = Depends(services)):
    avatars.check_id(avatar_id)
    if not s.store.exists(avatar_id) and (job := s.jobs.status(avatar_id)):
        return job
    return s.store.load(avatar_id).meta | {"status": "ready"}


@router.delete("/{avatar_id}")
def delete_avatar(avatar_id: str, s: Services = Depends(services)):
    """Delete an avatar, or cancel its preparation."""
    avatars.check_id(avatar_id)
    if s.jobs.cancel(avatar_id):
        if s.store.exists(avatar_id):  # it was published while the cancel reached it
            s.store.delete(avatar_id)
        return {"deleted": avatar_id, "cancelled": True}
    s.store.delete(avatar_id)
    return {"deleted": avatar_id}
