"""Avatars: prepared once (frontend/avatars/preparation.py), stored on disk, reused by every request.

One folder per avatar in the store (MUSETALK_AVATAR_DIR), which may be a volume
shared by several front ends. A tenant's avatar is `<tenant>.<id>` (ids have no dots: two
tenants' avatars of one id never meet); a shared avatar, and every avatar of a service
without API keys, is `<id>` (frontend/access.py says who may use and change which):

    <key>/meta.json    what it is (size, frames, faces...)
    <key>/frames.mp4   its frames, H.264 (frontend/avatars/frames.py): read as videos are composed
    <key>/latents.npy  vae_encoder latents per frame [n, 8, 32, 32] (zeros where no face)
    <key>/boxes.npy    face box per frame [n, 4] (-1 where no face)
    <key>/masks.npz    blend mask per frame with a face

A folder appears whole or not at all (it is renamed into place), so no replica
ever reads half an avatar; every load checks the folder is still the one cached,
so an avatar deleted or replaced through another replica is seen at once. In
memory, only what composition needs per frame stays cached (latents, boxes,
masks: 12 MB for 10 s with small faces, about 55 MB with a 1080p close-up), within a byte budget.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import threading
import uuid
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

from frontend.avatars.blending import Compositor
from frontend.avatars.faces import FaceBox
from frontend.avatars.frames import CycleReader

SAFE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")  # whole ids only: fullmatch (a "$" would let "\n" through)
KEY = re.compile(rf"(?:{SAFE_ID.pattern}\.)?{SAFE_ID.pattern}")  # where it is stored: [tenant.]id
FORMAT = 2  # 1: raw frames.npy (before 0.2), upgraded when first loaded; 2: frames.mp4


class AvatarError(ValueError):
    """An avatar request that cannot be honoured (a bad id, no face...)."""


class AvatarNotFound(AvatarError, LookupError):
    """No avatar of that id."""


class AvatarExists(AvatarError):
    """An avatar of that id exists already (or is being prepared)."""


class AvatarChanged(AvatarError):
    """The avatar was replaced or deleted while a request used it."""


def check_id(avatar_id: str) -> str:
    if not SAFE_ID.fullmatch(avatar_id or ""):
        raise AvatarError(
            f"invalid avatar id {avatar_id!r}: use 1-64 letters, digits, '_' or '-', "
            "starting with a letter or digit"
        )
    return avatar_id


def storage_key(tenant: str | None, avatar_id: str) -> str:
    """Where an avatar is stored: a tenant's as "<tenant>.<id>"; a shared one (tenant None) as its id."""
    check_id(avatar_id)
    return avatar_id if tenant is None else f"{check_id(tenant)}.{avatar_id}"


def owner_of(key: str) -> str | None:
    """The tenant a stored avatar belongs to (None: shared)."""
    return key.split(".", 1)[0] if "." in key else None


def name_of(key: str) -> str:
    """The id its owner knows a stored avatar by."""
    return key.rsplit(".", 1)[-1]


def present(state: dict) -> dict:
    """An avatar's meta, or its job's status, as its owner sees it: its own id, and whether it is shared."""
    key = state.get("id", "")
    return {**state, "id": name_of(key), "shared": owner_of(key) is None}


def _check_key(key: str) -> str:
    if not KEY.fullmatch(key or ""):
        check_id(key)  # says what an id may be
    return key


@dataclass
class Avatar:
    id: str
    folder: Path
    boxes: list[FaceBox | None]
    latents: np.ndarray  # [N, 8, 32, 32] float32: vae_encoder output per frame
    masks: list[np.ndarray | None]  # per frame, uint8 [box height, box width]
    meta: dict = field(default_factory=dict)
    # The folder as it was when loaded (a directory descriptor): frames are read from that
    # version even if the id is replaced meanwhile, never new frames with these latents.
    directory: int | None = field(default=None, repr=False)

    def open(self, name: str):
        """One of the avatar's files, from the version that was loaded."""
        if self.directory is None:
            return (self.folder / name).open("rb")
        try:
            return open(name, "rb", opener=lambda path, flags: os.open(path, flags, dir_fd=self.directory))
        except FileNotFoundError:
            raise AvatarChanged(f"avatar {self.id!r} was replaced or deleted while in use; retry") from None

    @property
    def name(self) -> str:
        """The id its owner knows it by (`id` is where it is stored: [tenant.]id)."""
        return name_of(self.id)

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the output video."""
        return self.meta["width"], self.meta["height"]

    @property
    def frame_count(self) -> int:
        return len(self.boxes)

    def cycle_index(self, i: int) -> int:
        """Frame i of the ping-pong cycle `frames + frames[::-1]`, as a source index."""
        n = self.frame_count
        j = i % (2 * n)
        return j if j < n else 2 * n - 1 - j

    def reader(self) -> CycleReader:
        """The avatar's frames, for one video at a time (each stream opens its own)."""
        return CycleReader(self.open("frames.mp4"), self.frame_count)

    @cached_property
    def compositor(self) -> Compositor:
        width, height = self.size
        return Compositor(self.boxes, self.masks, height, width)

    @property
    def nbytes(self) -> int:
        """What this avatar holds in memory."""
        return self.latents.nbytes + sum(m.nbytes for m in self.masks if m is not None) + 64 * len(self.boxes)


def save_material(folder: Path, boxes: list[FaceBox | None], latents: np.ndarray,
                  masks: list[np.ndarray | None]) -> None:
    """What composition needs per frame, beside frames.mp4 (meta.json is written last)."""
    np.save(folder / "boxes.npy", np.array([b.as_tuple() if b else (-1, -1, -1, -1) for b in boxes], np.int32))
    np.save(folder / "latents.npy", latents)
    # Masks are mostly zeros and smooth ramps: compressed, a few kB each.
    np.savez_compressed(folder / "masks.npz", **{str(i): m for i, m in enumerate(masks) if m is not None})


def load_folder(avatar_id: str, folder: Path) -> Avatar:
    """Every file from one version of the folder (through a directory descriptor: a folder
    replaced while it is read is not mixed with the new one)."""
    try:
        directory = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except FileNotFoundError:
        raise AvatarNotFound(f"unknown avatar {avatar_id!r}") from None
    avatar = Avatar(avatar_id, folder, [], np.zeros(0), [], {}, directory)
    weakref.finalize(avatar, os.close, directory)
    with avatar.open("meta.json") as file:
        avatar.meta = json.load(file)
    with avatar.open("boxes.npy") as file:
        avatar.boxes = [FaceBox(*map(int, b)) if b[0] >= 0 else None for b in np.load(file)]
    with avatar.open("masks.npz") as file, np.load(file) as stored:
        avatar.masks = [stored[str(i)] if str(i) in stored.files else None for i in range(len(avatar.boxes))]
    with avatar.open("latents.npy") as file:
        avatar.latents = np.load(file)
    return avatar


def upgrade_format_1(avatar_id: str, folder: Path) -> None:
    """Rewrite an avatar of format 1 (raw frames.npy, up to 1.5 GB for 10 s of 1080p) as format 2,
    then swap it into place: the same frames, boxes, latents and masks."""
    from frontend.avatars.frames import FramesWriter

    meta = json.loads((folder / "meta.json").read_text())
    staging = folder.parent / f".upgrade-{avatar_id}-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        frames = np.load(folder / "frames.npy", mmap_mode="r")
        writer = FramesWriter(staging / "frames.mp4", frames.shape[2], frames.shape[1])
        for frame in frames:
            writer.write(np.ascontiguousarray(frame))
        writer.close()
        with np.load(folder / "masks.npz") as stored:  # format 1 kept them as arr_0, arr_1, ...
            masks = [stored[f"arr_{i}"] for i in range(len(stored.files))]
        boxes = [FaceBox(*map(int, b)) for b in np.load(folder / "boxes.npy")]
        save_material(staging, boxes, np.load(folder / "latents.npy"), masks)
        meta.update(format=FORMAT, fps=25.0, faceless_frames=0, faceless=[], interpolated_frames=0,
                    upgraded_from_format=1)
        (staging / "meta.json").write_text(json.dumps(meta, indent=1))
        trash = folder.parent / f".trash-{avatar_id}-{uuid.uuid4().hex[:8]}"
        folder.rename(trash)
        staging.rename(folder)
        shutil.rmtree(trash, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


class AvatarStore:
    """Avatars on disk, one folder each; the recently used ones cached within `cache_bytes`."""

    def __init__(self, root: Path, cache_bytes: int = 1 << 30):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.cache_bytes = cache_bytes
        self._cache: OrderedDict[str, tuple[tuple, Avatar]] = OrderedDict()  # id -> (folder identity, avatar)
        self._lock = threading.Lock()
        self._upgrading = threading.Lock()
        # What a crash left mid-delete or mid-upgrade: never a half avatar (those are staged in .jobs).
        for leftover in [*self.root.glob(".trash-*"), *self.root.glob(".upgrade-*")]:
            shutil.rmtree(leftover, ignore_errors=True)

    def path(self, avatar_id: str) -> Path:
        return self.root / _check_key(avatar_id)

    def exists(self, avatar_id: str) -> bool:
        return (self.path(avatar_id) / "meta.json").is_file()

    def ensure_absent(self, avatar_id: str) -> None:
        if self.path(avatar_id).exists():
            raise AvatarExists(f"avatar {avatar_id!r} already exists; delete it first")

    def publish(self, avatar_id: str, staging: Path) -> None:
        """Move a prepared folder into place, atomically: the avatar appears whole or not at all.
        Two replicas publishing one id: the first wins, the second gets AvatarExists."""
        try:
            staging.rename(self.path(avatar_id))  # fails on a non-empty target, on one host or NFS
        except OSError as error:
            if self.path(avatar_id).exists():
                raise AvatarExists(f"avatar {avatar_id!r} already exists; delete it first") from error
            raise

    def load(self, avatar_id: str) -> Avatar:
        folder = self.path(avatar_id)
        identity = _identity(folder)
        if identity is None:
            with self._lock:
                self._cache.pop(avatar_id, None)
            raise AvatarNotFound(f"unknown avatar {avatar_id!r}")
        with self._lock:
            cached = self._cache.get(avatar_id)
            if cached and cached[0] == identity:
                self._cache.move_to_end(avatar_id)
                return cached[1]
        if _format(folder) == 1:
            with self._upgrading:  # one upgrade at a time (another replica may be at it too: no harm)
                if _format(folder) == 1:
                    upgrade_format_1(avatar_id, folder)
            identity = _identity(folder)
        avatar = load_folder(avatar_id, folder)
        with self._lock:
            self._cache[avatar_id] = (identity, avatar)
            self._cache.move_to_end(avatar_id)
            self._evict()
        return avatar

    def _evict(self) -> None:
        while len(self._cache) > 1 and sum(a.nbytes for _, a in self._cache.values()) > self.cache_bytes:
            self._cache.popitem(last=False)

    @property
    def cached_bytes(self) -> int:
        with self._lock:
            return sum(a.nbytes for _, a in self._cache.values())

    def upgrade_all(self) -> None:
        """Upgrade every avatar of an earlier format now, rather than at its first request."""
        for meta in self._metas():
            if _format(meta.parent) == 1:
                self.load(meta.parent.name)

    def list(self, tenant: str | None = None) -> list[dict]:
        """The ready avatars `tenant` sees: its own and the shared ones (tenant None: the shared ones),
        as it knows them (present)."""
        out = []
        for meta in self._metas():
            if owner_of(meta.parent.name) not in (None, tenant):
                continue
            try:
                out.append(present({**json.loads(meta.read_text()), "id": meta.parent.name, "status": "ready"}))
            except (OSError, ValueError):
                continue  # deleted meanwhile
        return out

    def _metas(self) -> list[Path]:
        """meta.json of every published avatar: not the hidden folders (.jobs, .trash-*,
        .upgrade-*), which glob's "*" matches too."""
        return sorted(m for m in self.root.glob("*/meta.json") if not m.parent.name.startswith("."))

    def delete(self, avatar_id: str) -> None:
        folder = self.path(avatar_id)
        trash = self.root / f".trash-{avatar_id}-{uuid.uuid4().hex[:8]}"
        try:
            folder.rename(trash)  # atomic disappearance, then the slow removal
        except FileNotFoundError:
            raise AvatarNotFound(f"unknown avatar {avatar_id!r}") from None
        with self._lock:
            self._cache.pop(avatar_id, None)
        shutil.rmtree(trash, ignore_errors=True)


def _format(folder: Path) -> int | None:
    try:
        return json.loads((folder / "meta.json").read_text()).get("format")
    except (OSError, ValueError):
        return None


def _identity(folder: Path) -> tuple | None:
    """What tells one published folder from another (a deleted then re-prepared id too)."""
    try:
        stat = os.stat(folder / "meta.json")
    except OSError:
        return None
    return stat.st_ino, stat.st_mtime_ns, stat.st_size
