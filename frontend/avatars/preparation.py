"""Preparing an avatar from real footage, in bounded memory.

Two passes over the upload, one frame at a time (never all frames at once):

1. Faces: 68 landmarks per frame (frontend/avatars/faces.py: small faces too). Frames
   where none is found in a short gap (at most MAX_GAP frames) between two found
   faces get landmarks interpolated between them: a blink or a motion blur that
   hid the face for a frame keeps the lips moving. Longer gaps keep the original
   frame (no lip sync there, as upstream does), and the avatar says how many.
   Only when most frames have no face is the video refused, naming them.
2. Material: upstream's face box, the 256x256 crop (Lanczos) sent to Triton's
   vae_encoder in batches while the next frames are read, the blend mask, and
   the frame itself into the avatar's H.264 frames file (frontend/avatars/frames.py).

Progress is reported per frame; `cancelled()` is asked as often, so a
preparation stops within a frame of being cancelled.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path

import cv2
import numpy as np

from contract import specs
from frontend.avatars.blending import blend_mask
from frontend.avatars.faces import FaceBox, LandmarkFinder, face_box
from frontend.avatars.frames import FramesWriter
from frontend.avatars.media import Media
from frontend.avatars.store import FORMAT, AvatarError, save_material

MAX_GAP = 2  # frames without a face between two with one that get interpolated landmarks
ENCODE_BATCH = 16  # crops per vae_encoder request (its max batch)


class Cancelled(Exception):
    """The preparation was cancelled (DELETE while preparing)."""


Progress = Callable[[str, int, int], None]  # (stage, frames done, frames in all)


def prepare(avatar_id: str, media: Media, submit: Callable[[np.ndarray], Future], folder: Path,
            bbox_shift: int = 0, extra_margin: int = 10, progress: Progress = lambda *_: None,
            cancelled: Callable[[], bool] = lambda: False, give_way: Callable[[], float] = lambda: 0.0) -> dict:
    """Write the avatar's files into `folder` (frames.mp4, boxes, latents, masks, meta.json);
    `submit` sends crops to the vae_encoder and returns a Future. Returns the meta. `give_way()`
    is called before each frame: it pauses while live work is awaited (frontend/live_first.py)."""
    started = time.perf_counter()
    # Where the time goes. vae_encoder runs on Triton while the frames are read: its figure is
    # what was left to wait for after the last frame.
    seconds = dict.fromkeys(("decode", "detection", "landmarks", "crop_and_mask", "frames_h264",
                             "vae_encoder_wait", "save"), 0.0)
    landmarks = find_faces(media, progress, cancelled, seconds, give_way)
    total = len(landmarks)
    interpolated = fill_gaps(landmarks)
    faceless = [i for i, points in enumerate(landmarks) if points is None]
    if len(faceless) * 2 > total or len(faceless) == total:
        raise AvatarError(f"no face found in {describe_frames(faceless, total)}")

    writer = FramesWriter(folder / "frames.mp4", media.width, media.height, media.fps)
    boxes: list[FaceBox | None] = []
    masks: list[np.ndarray | None] = []
    pending: list[tuple[list[int], Future]] = []
    crops, crop_frames = [], []
    try:
        for i, frame in enumerate(timed(media.read(), seconds)):
            if i >= total:
                break
            if cancelled():
                raise Cancelled()
            give_way()
            t = time.perf_counter()
            writer.write(frame)
            seconds["frames_h264"] += time.perf_counter() - t
            t = time.perf_counter()
            box = face_box(landmarks[i], frame.shape, bbox_shift, extra_margin) if landmarks[i] is not None else None
            boxes.append(box)
            masks.append(blend_mask(landmarks[i], box) if box else None)
            if box:
                crops.append(cv2.resize(frame[box.y1 : box.y2, box.x1 : box.x2], (specs.FACE_SIZE, specs.FACE_SIZE),
                                        interpolation=cv2.INTER_LANCZOS4))
                crop_frames.append(i)
            if len(crops) == ENCODE_BATCH:  # encoded while the next frames are read
                pending.append((crop_frames, submit(np.stack(crops))))
                crops, crop_frames = [], []
            seconds["crop_and_mask"] += time.perf_counter() - t
            progress("encoding faces", total + i + 1, 2 * total)
        if crops:
            pending.append((crop_frames, submit(np.stack(crops))))
        t = time.perf_counter()
        latents = np.zeros((total, 2 * specs.LATENT_CHANNELS, specs.LATENT_SIZE, specs.LATENT_SIZE), np.float32)
        for indices, future in pending:
            latents[indices] = wait_for(future, cancelled)
        seconds["vae_encoder_wait"] += time.perf_counter() - t
    finally:
        writer.close()
        for _, future in pending:
            future.cancel()
    faceless = [i for i, box in enumerate(boxes) if box is None]  # degenerate boxes too
    meta = {
        "id": avatar_id, "format": FORMAT, "frames": total, "width": media.width, "height": media.height,
        "fps": round(media.fps, 3), "faceless_frames": len(faceless), "faceless": faceless[:100],
        "interpolated_frames": interpolated, "bbox_shift": bbox_shift, "extra_margin": extra_margin,
        "trimmed_from_seconds": media.trimmed_from_seconds, "rotation": media.rotation,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if cancelled():
        raise Cancelled()
    t = time.perf_counter()
    save_material(folder, boxes, latents, masks)
    seconds["save"] = time.perf_counter() - t
    meta["prepare_seconds"] = round(time.perf_counter() - started, 2)
    meta["stage_seconds"] = {k: round(v, 3) for k, v in seconds.items()}
    return meta


def wait_for(future: Future, cancelled: Callable[[], bool]):
    """A vae_encoder answer, looking every 0.2 s whether the preparation was cancelled (the
    pending requests are cancelled, on Triton too, by the caller)."""
    while True:
        try:
            return future.result(timeout=0.2)
        except TimeoutError:
            if cancelled():
                raise Cancelled() from None


def find_faces(media: Media, progress: Progress, cancelled: Callable[[], bool],
               seconds: dict[str, float], give_way: Callable[[], float] = lambda: 0.0) -> list[np.ndarray | None]:
    """Pass 1: landmarks of every frame (None where no face is found)."""
    finder = LandmarkFinder()
    landmarks = []
    for i, frame in enumerate(timed(media.read(), seconds)):
        if cancelled():
            raise Cancelled()
        give_way()
        landmarks.append(finder.find(frame))
        progress("finding faces", i + 1, 2 * media.frames)
    for stage, value in finder.seconds.items():
        seconds[stage] += value
    return landmarks


def timed(frames, seconds: dict[str, float]):
    """`frames`, the time spent decoding them added to seconds["decode"]."""
    iterator = iter(frames)
    while True:
        started = time.perf_counter()
        try:
            frame = next(iterator)
        except StopIteration:
            return
        finally:
            seconds["decode"] += time.perf_counter() - started
        yield frame


def fill_gaps(landmarks: list[np.ndarray | None], max_gap: int = MAX_GAP) -> int:
    """Interpolate landmarks across gaps of at most `max_gap` frames between two faces; the
    number of frames filled."""
    filled, i = 0, 0
    while i < len(landmarks):
        if landmarks[i] is not None:
            i += 1
            continue
        end = i
        while end < len(landmarks) and landmarks[end] is None:
            end += 1
        if 0 < i and end < len(landmarks) and end - i <= max_gap:
            before, after = landmarks[i - 1], landmarks[end]
            for k in range(i, end):
                t = (k - i + 1) / (end - i + 1)
                landmarks[k] = (1 - t) * before + t * after
            filled += end - i
        i = end
    return filled


def describe_frames(indices: list[int], total: int) -> str:
    if total == 1:
        return "the image"
    shown = ", ".join(map(str, indices[:10])) + (", ..." if len(indices) > 10 else "")
    return f"{len(indices)} of {total} frames (frame {shown})"
