"""Avatars: prepare one from a photo or a video, list, look up, delete."""
from __future__ import annotations

from fastapi import APIRouter, Depends, File, Form, UploadFile

from frontend import avatars
from frontend.services import Services, services

router = APIRouter(prefix="/avatars", tags=["avatars"])


@router.post("", status_code=201)
def create_avatar(
    file: UploadFile = File(..., description="an image or a short video of one face"),
    avatar_id: str = Form(..., description="1-64 letters, digits, '_' or '-'"),
    bbox_shift: int = Form(0, ge=-100, le=100, description="moves the face box's top (v1.0 knob)"),
    extra_margin: int = Form(10, ge=0, le=100, description="pixels added below the chin (v1.5)"),
    s: Services = Depends(services),
):
    """Prepare an avatar: face boxes, crops, latents (Triton vae_encoder), blend masks."""
    s.store.ensure_absent(avatars.check_id(avatar_id))
    return s.prepare(avatar_id, s.read_upload(file), bbox_shift, extra_margin).meta


@router.get("")
def list_avatars(s: Services = Depends(services)):
    return {"avatars": s.store.list(), "default": s.settings.default_avatar}


@router.get("/{avatar_id}")
def get_avatar(avatar_id: str, s: Services = Depends(services)):
    return s.store.load(avatars.check_id(avatar_id)).meta


@router.delete("/{avatar_id}")
def delete_avatar(avatar_id: str, s: Services = Depends(services)):
    s.store.delete(avatars.check_id(avatar_id))
    return {"deleted": avatar_id}
