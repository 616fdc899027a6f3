"""Pasting generated faces back into avatar frames (upstream's blending.py, in numpy).

Upstream pastes the face into an expanded square crop of the frame, then pastes
that crop back through a feathered mask that keeps only the lower half of the
face. Outside the face box the crop holds the frame's own pixels, so only the
face box can change: the mask is stored for that box alone and blending touches
nothing else.
"""
from __future__ import annotations

import cv2
import numpy as np

from frontend.avatars.faces import FaceBox

EXPAND = 1.5  # crop box side = 1.5 x the face box's larger side
UPPER_BOUNDARY_RATIO = 0.5  # the mask keeps the crop's lower half: below the nose


def crop_box(box: FaceBox, expand: float = EXPAND) -> tuple[int, int, int, int]:
    """Upstream's get_crop_box: a square of side 2s centred on the face box."""
    x_c, y_c = (box.x1 + box.x2) // 2, (box.y1 + box.y2) // 2
    s = int(max(box.width, box.height) // 2 * expand)
    return (x_c - s, y_c - s, x_c + s, y_c + s)


def blend_mask(landmarks: np.ndarray, box: FaceBox) -> np.ndarray:
    """The feathered blend mask over the face box: uint8 [box.height, box.width].

    Upstream's get_image_prepare_material, with the face-parsing mask (BiSeNet,
    weights we cannot ship) replaced by the face outline from the landmarks
    (jaw line and brows): it is cut to the face box, only the part below the
    crop box's middle is kept, and it is blurred with a Gaussian of kernel
    int(0.1 * side // 2 * 2) + 1.
    """
    x_s, y_s, x_e, _ = crop_box(box)
    side = x_e - x_s
    outline = np.zeros((side, side), np.uint8)
    hull = cv2.convexHull(np.round(landmarks - (x_s, y_s)).astype(np.int32))
    cv2.fillConvexPoly(outline, hull, 255)
    inside = np.zeros_like(outline)
    fy1, fx1 = box.y1 - y_s, box.x1 - x_s
    inside[fy1 : fy1 + box.height, fx1 : fx1 + box.width] = \
        outline[fy1 : fy1 + box.height, fx1 : fx1 + box.width]
    inside[: int(side * UPPER_BOUNDARY_RATIO)] = 0
    kernel = int(0.1 * side // 2 * 2) + 1
    mask = cv2.GaussianBlur(inside, (kernel, kernel), 0)
    return np.ascontiguousarray(mask[fy1 : fy1 + box.height, fx1 : fx1 + box.width])


def blend_into(region: np.ndarray, face: np.ndarray, mask: np.ndarray, strength: float = 1.0) -> None:
    """region = face * w + region * (1 - w), w = mask * strength, with `mask` uint8 (255 = all face)."""
    weight = mask.astype(np.float32) * (strength / 255)
    region[:] = cv2.blendLinear(face, region, weight, 1 - weight)


def i420_planes(i420: np.ndarray, height: int, width: int):
    """Views of the Y, U and V planes of an OpenCV I420 buffer ([h * 3/2, w] uint8)."""
    flat = i420.reshape(-1)
    y_size, c_size = height * width, (height // 2) * (width // 2)
    return (
        flat[:y_size].reshape(height, width),
        flat[y_size : y_size + c_size].reshape(height // 2, width // 2),
        flat[y_size + c_size : y_size + 2 * c_size].reshape(height // 2, width // 2),
    )


def _patch(planes, y1: int, y2: int, x1: int, x2: int) -> np.ndarray:
    """The I420 buffer of a region (even coordinates) of a frame's planes."""
    h, w = y2 - y1, x2 - x1
    patch = np.empty((h * 3 // 2, w), np.uint8)
    out = i420_planes(patch, h, w)
    out[0][:] = planes[0][y1:y2, x1:x2]
    out[1][:] = planes[1][y1 // 2 : y2 // 2, x1 // 2 : x2 // 2]
    out[2][:] = planes[2][y1 // 2 : y2 // 2, x1 // 2 : x2 // 2]
    return patch


class Compositor:
    """Blends generated faces into an avatar's frames, in I420 (the video encoder's input).

    Frames arrive already in I420 (decoded from the avatar's H.264, frontend/avatars/frames.py).
    Per generated frame only the face box's rows that the mask keeps (widened to even
    coordinates, so chroma samples stay whole) go to BGR, are blended, and come back:
    no full-frame colour conversion. OpenCV's I420 is BT.601 limited range, as FFmpeg's
    default, within one level. Frames without a face pass through unchanged.
    """

    def __init__(self, boxes: list[FaceBox | None], masks: list[np.ndarray | None], height: int, width: int):
        self.boxes, self.masks = boxes, masks
        self.height, self.width = height, width
        self._top: dict[int, int] = {}

    def compose(self, index: int, frame_i420: np.ndarray, face: np.ndarray, strength: float = 1.0) -> np.ndarray:
        """`frame_i420` (avatar frame `index`, modified in place) with the generated 256x256 `face`
        blended in; `strength` < 1 fades it (the transitions to and from the avatar's own face)."""
        box, mask = self.boxes[index], self.masks[index]
        if box is None:
            return frame_i420  # no face found in this frame: it stays as it was
        top = self._first_blended_row(index)
        if top == box.height:
            return frame_i420  # an empty mask: nothing of the face is kept
        y1, x1 = box.y1 + top, box.x1
        py1, px1 = y1 - y1 % 2, x1 - x1 % 2
        py2, px2 = min(box.y2 + box.y2 % 2, self.height), min(box.x2 + box.x2 % 2, self.width)
        planes = i420_planes(frame_i420, self.height, self.width)
        patch = cv2.cvtColor(_patch(planes, py1, py2, px1, px2), cv2.COLOR_YUV2BGR_I420)
        resized = cv2.resize(face, (box.width, box.height))  # bilinear, as upstream
        blend_into(patch[y1 - py1 : box.y2 - py1, x1 - px1 : box.x2 - px1], resized[top:], mask[top:], strength)
        blended = i420_planes(cv2.cvtColor(patch, cv2.COLOR_BGR2YUV_I420), py2 - py1, px2 - px1)
        planes[0][py1:py2, px1:px2] = blended[0]
        for plane, source in zip(planes[1:], blended[1:]):
            plane[py1 // 2 : py2 // 2, px1 // 2 : px2 // 2] = source
        return frame_i420

    def _first_blended_row(self, index: int) -> int:
        if index not in self._top:
            rows = np.flatnonzero(self.masks[index].any(axis=1))
            self._top[index] = int(rows[0]) if len(rows) else self.boxes[index].height
        return self._top[index]
