"""Avatars: prepare one from a photo or a video (a job, with progress), list, look up, delete.

Each tenant's avatars are its own (another tenant gets 404); shared avatars (the default one, and
those an operator publishes with `shared=true`) every tenant can use and only an operator can
delete. Without API keys every avatar is shared (frontend/access.py)."""
from __future__ import annotations

from fastapi import APIRouter, Depends, File, Form, Query, UploadFile
from fastapi.responses import JSONResponse

from frontend.access import Caller, Forbidden, audit
from frontend.avatars import store as avatars
from frontend.errors import error_response
from frontend.routes.auth import key_holder
from frontend.services import Services, services

router = APIRouter(prefix="/avatars", tags=["avatars"])


@router.post("", status_code=201, responses={202: {"description": "being prepared: follow the Location"}})
def create_avatar(
    file: UploadFile = File(..., description="an image or a video of one face (the first "
                            "MUSETALK_MAX_AVATAR_SECONDS are used)"),
    avatar_id: str = Form(..., description="1-64 letters, digits, '_' or '-'"),
    bbox_shift: int = Form(0, ge=-100, le=100, description="moves the face box's top (v1.0 knob)"),
    extra_margin: int = Form(10, ge=0, le=100, description="pixels added below the chin (v1.5)"),
    shared: bool = Form(False, description="an operator's avatar that every tenant may use (operators only)"),
    s: Services = Depends(services),
    caller: Caller = Depends(key_holder),
):
    """Prepare an avatar: face boxes, crops, latents (Triton vae_encoder), blend masks.

    Answers 201 with the avatar when it is ready within MUSETALK_PREPARE_WAIT_SECONDS (a
    photo), else 202 with its status (`GET /avatars/{id}`: preparing, frames done / total,
    then ready or failed with the reason). `DELETE /avatars/{id}` cancels a preparation."""
    avatars.check_id(avatar_id)
    if shared and not caller.operator:
        raise Forbidden("only an operator's key may publish a shared avatar (TENANT:KEY:operator)")
    key = avatars.storage_key(None if shared else caller.tenant, avatar_id)
    s.store.ensure_absent(key)
    data = s.read_upload(file)
    s.open_media(data)  # a bad or too large file is refused now, not in the job
    s.jobs.submit(key, data, {"bbox_shift": bbox_shift, "extra_margin": extra_margin},
                  tenant_limit=s.tenant_preparations)
    audit(caller, "created", "shared avatar" if shared and caller.tenant else "avatar", avatar_id)
    job = s.jobs.wait(key, s.settings.prepare_wait_seconds)
    if job is None:
        return avatars.present(s.store.load(key).meta | {"id": key, "status": "ready"})
    if job["status"] == "failed":
        return error_response(job.get("http_status", 422), job["error"])
    return JSONResponse({**avatars.present(job), "status_url": f"/avatars/{avatar_id}"}, status_code=202,
                        headers={"Location": f"/avatars/{avatar_id}"})


@router.get("")
def list_avatars(s: Services = Depends(services), caller: Caller = Depends(key_holder)):
    """The caller's avatars and the shared ones: ready, being prepared or failed (with their `status`)."""
    return {"avatars": s.store.list(caller.tenant) + s.jobs.list(caller.tenant), "default": s.settings.default_avatar}


@router.get("/{avatar_id}")
def get_avatar(avatar_id: str, s: Services = Depends(services), caller: Caller = Depends(key_holder)):
    avatars.check_id(avatar_id)
    for key in s.avatar_keys(avatar_id, caller):
        if s.store.exists(key):
            return avatars.present(s.store.load(key).meta | {"id": key, "status": "ready"})
        if job := s.jobs.status(key):
            return avatars.present(job)
    raise avatars.AvatarNotFound(f"unknown avatar {avatar_id!r}")


@router.delete("/{avatar_id}")
def delete_avatar(avatar_id: str, s: Services = Depends(services), caller: Caller = Depends(key_holder),
                  shared: bool = Query(False, description="the shared avatar of that id (operators only)")):
    """Delete one of the caller's avatars, or cancel its preparation; an operator deletes a shared
    one with `shared=true`."""
    avatars.check_id(avatar_id)
    if shared and not caller.operator:
        raise Forbidden("only an operator's key may delete a shared avatar")
    key = avatars.storage_key(None if shared else caller.tenant, avatar_id)
    if caller.tenant is not None and not shared and not s.store.exists(key) and not s.jobs.status(key) \
            and (s.store.exists(avatar_id) or s.jobs.status(avatar_id)):
        raise Forbidden(f"{avatar_id!r} is a shared avatar: only an operator's key deletes it (shared=true)")
    cancelled = s.jobs.cancel(key)
    if cancelled:
        if s.store.exists(key):  # it was published while the cancel reached it
            s.store.delete(key)
    else:
        s.store.delete(key)
    audit(caller, "deleted", "shared avatar" if shared else "avatar", avatar_id)
    return {"deleted": avatar_id, **({"cancelled": True} if cancelled else {})}
