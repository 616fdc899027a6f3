"""Avatars: prepared once (upstream's real-time Avatar), stored on disk, reused per request.

Preparation finds the face in every frame, crops it to 256x256, encodes the
crops to latents on Triton's vae_encoder and builds each frame's blend mask.
The ping-pong cycle (frames then frames reversed) is not stored: it is an index.
"""
from __future__ import annotations

import json
import re
import shutil
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from contract import specs
from frontend.blending import Compositor, blend_mask
from frontend.faces import FaceBox, LandmarkFinder, face_box
from frontend.video import read_frames

SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
FORMAT = 1


class AvatarError(ValueError):
    """An avatar request that cannot be honoured (a bad id, no face...)."""


class AvatarNotFound(AvatarError, LookupError):
    """No avatar of that id."""


class AvatarExists(AvatarError):
    """An avatar of that id exists already (or is being prepared)."""


def check_id(avatar_id: str) -> str:
    if not SAFE_ID.match(avatar_id or ""):
        raise AvatarError(
            f"invalid avatar id {avatar_id!r}: use 1-64 letters, digits, '_' or '-', "
            "starting with a letter or digit"
        )
    return avatar_id


@dataclass
class Avatar:
    id: str
    frames: np.ndarray  # [N, H, W, 3] uint8 BGR, the source frames in order
    boxes: list[FaceBox]
    latents: np.ndarray  # [N, 8, 32, 32] float32: vae_encoder output per frame
    masks: list[np.ndarray]  # per frame, uint8 [box height, box width]
    meta: dict = field(default_factory=dict)
    _compositor: Compositor | None = None

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the output video."""
        return self.frames.shape[2], self.frames.shape[1]

    def cycle_index(self, i: int) -> int:
        """Frame i of the ping-pong cycle `frames + frames[::-1]`, as a source index."""
        n = len(self.frames)
        j = i % (2 * n)
        return j if j < n else 2 * n - 1 - j

    @property
    def compositor(self) -> Compositor:
        if self._compositor is None:
            self._compositor = Compositor(self.frames, self.boxes, self.masks)
        return self._compositor


def prepare(avatar_id: str, media: bytes, encode: Callable[[np.ndarray], np.ndarray],
            bbox_shift: int = 0, extra_margin: int = 10, max_frames: int = 250,
            progress: Callable[[str], None] = print, max_pixels: int | None = None) -> Avatar:
    """Build an avatar from an image or video's bytes; `encode` is Triton's vae_encoder."""
    frames = read_frames(media, max_frames, max_pixels)
    finder = LandmarkFinder()
    boxes, landmarks, missing = [], [], []
    started = time.perf_counter()
    for i, frame in enumerate(frames):
        points = finder.find(frame)
        box = face_box(points, frame.shape, bbox_shift, extra_margin) if points is not None else None
        if box is None:
            missing.append(i)
            continue
        boxes.append(box)
        landmarks.append(points)
        if (i + 1) % 25 == 0:
            progress(f"avatar {avatar_id}: faces found in {i + 1}/{len(frames)} frames")
    if missing:
        raise AvatarError(f"no face found in {_describe_frames(missing, len(frames))}")
    crops = np.stack([
        cv2.resize(f[b.y1 : b.y2, b.x1 : b.x2], (specs.FACE_SIZE, specs.FACE_SIZE),
                   interpolation=cv2.INTER_LANCZOS4)
        for f, b in zip(frames, boxes)
    ])
    latents = encode(crops)
    masks = [blend_mask(lm, b) for lm, b in zip(landmarks, boxes)]
    meta = {
        "id": avatar_id, "format": FORMAT, "frames": len(frames),
        "width": int(frames[0].shape[1]), "height": int(frames[0].shape[0]),
        "bbox_shift": bbox_shift, "extra_margin": extra_margin,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "prepare_seconds": round(time.perf_counter() - started, 2),
    }
    return Avatar(avatar_id, np.stack(frames), boxes, latents.astype(np.float32), masks, meta)


def _describe_frames(indices: list[int], total: int) -> str:
    if total == 1:
        return "the image"
    shown = ", ".join(map(str, indices[:10])) + (", ..." if len(indices) > 10 else "")
    return f"{len(indices)} of {total} frames (frame {shown})"


class AvatarStore:
    """Avatars on disk, one folder each, written atomically; the last few used stay in memory."""

    def __init__(self, root: Path, cached: int = 8):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._cache: OrderedDict[str, Avatar] = OrderedDict()
        self._cached = cached
        self._lock = threading.Lock()
        # A crash mid-save leaves only a staging folder: never a half avatar.
        for leftover in self.root.glob(".staging-*"):
            shutil.rmtree(leftover, ignore_errors=True)

    def path(self, avatar_id: str) -> Path:
        return self.root / check_id(avatar_id)

    def exists(self, avatar_id: str) -> bool:
        return (self.path(avatar_id) / "meta.json").is_file()

    def ensure_absent(self, avatar_id: str) -> None:
        if self.path(avatar_id).exists():
            raise AvatarExists(f"avatar {avatar_id!r} already exists; delete it first")

    def save(self, avatar: Avatar) -> None:
        target = self.path(avatar.id)
        staging = self.root / f".staging-{avatar.id}-{uuid.uuid4().hex[:8]}"
        staging.mkdir()
        try:
            np.save(staging / "frames.npy", avatar.frames)
            np.save(staging / "latents.npy", avatar.latents)
            np.save(staging / "boxes.npy", np.array([b.as_tuple() for b in avatar.boxes], np.int32))
            np.savez(staging / "masks.npz", *avatar.masks)
            (staging / "meta.json").write_text(json.dumps(avatar.meta, indent=2))
            with self._lock:
                self.ensure_absent(avatar.id)
                staging.rename(target)  # atomic: the avatar appears whole or not at all
                self._remember(avatar)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def load(self, avatar_id: str) -> Avatar:
        with self._lock:
            if avatar_id in self._cache:
                self._cache.move_to_end(avatar_id)
                return self._cache[avatar_id]
        folder = self.path(avatar_id)
        if not self.exists(avatar_id):
            raise AvatarNotFound(f"unknown avatar {avatar_id!r}")
        with np.load(folder / "masks.npz") as masks:
            mask_list = [masks[f"arr_{i}"] for i in range(len(masks.files))]
        avatar = Avatar(
            avatar_id,
            np.load(folder / "frames.npy", mmap_mode="r"),
            [FaceBox(*map(int, b)) for b in np.load(folder / "boxes.npy")],
            np.load(folder / "latents.npy"),
            mask_list,
            json.loads((folder / "meta.json").read_text()),
        )
        with self._lock:
            return self._remember(self._cache.get(avatar_id, avatar))

    def _remember(self, avatar: Avatar) -> Avatar:
        self._cache[avatar.id] = avatar
        self._cache.move_to_end(avatar.id)
        while len(self._cache) > self._cached:
            self._cache.popitem(last=False)
        return avatar

    def list(self) -> list[dict]:
        return [json.loads(p.read_text()) for p in sorted(self.root.glob("*/meta.json"))
                if not p.parent.name.startswith(".")]

    def delete(self, avatar_id: str) -> None:
        folder = self.path(avatar_id)
        if not self.exists(avatar_id):
            raise AvatarNotFound(f"unknown avatar {avatar_id!r}")
        with self._lock:
            self._cache.pop(avatar_id, None)
            trash = self.root / f".staging-deleted-{avatar_id}-{uuid.uuid4().hex[:8]}"
            folder.rename(trash)  # atomic disappearance, then the slow removal
        shutil.rmtree(trash, ignore_errors=True)
