"""Face box, blend mask and I420 composition: upstream's rules, checked on real landmarks."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from frontend.avatars.blending import Compositor, blend_mask, crop_box, i420_planes
from frontend.avatars.faces import NOSE, FaceBox, LandmarkFinder, face_box


@pytest.fixture(scope="module")
def landmarks(face_image):
    points = LandmarkFinder().find(face_image)
    assert points is not None and points.shape == (68, 2)
    return points


def test_face_box_follows_upstreams_rule(landmarks, face_image):
    box = face_box(landmarks, face_image.shape, bbox_shift=0, extra_margin=10)
    lm = landmarks.astype(np.int32)
    chin, nose = lm[:, 1].max(), lm[NOSE, 1]
    assert (box.x1, box.x2) == (lm[:, 0].min(), lm[:, 0].max())
    assert box.y2 == chin + 10  # v1.5's extra_margin below the chin
    assert box.y1 == nose - (chin - nose)  # the top mirrored around the nose
    shifted = face_box(landmarks, face_image.shape, bbox_shift=6, extra_margin=0)
    assert shifted.y1 == box.y1 + 12 and shifted.y2 == chin  # v1.0's bbox_shift moves the nose


def test_face_box_is_clipped_to_the_frame(landmarks):
    box = face_box(landmarks, (150, 512, 3), extra_margin=500)
    assert box.y2 == 150


def test_blend_mask_keeps_the_lower_face_feathered(landmarks, face_image):
    box = face_box(landmarks, face_image.shape)
    mask = blend_mask(landmarks, box)
    assert mask.shape == (box.height, box.width) and mask.dtype == np.uint8
    x_s, y_s, x_e, y_e = crop_box(box)
    middle = (y_s + y_e) // 2 - box.y1  # the crop's middle, in box rows
    blur = int(0.1 * (x_e - x_s) // 2 * 2) + 1
    assert not mask[: middle - blur // 2 - 1].any()  # nothing above the middle (minus the blur)
    mouth = mask[int(box.height * 0.8), box.width // 2]
    assert mouth == 255
    assert ((mask > 0) & (mask < 255)).any()  # feathered edges


def test_compose_changes_only_the_lower_face(landmarks, face_image):
    box = face_box(landmarks, face_image.shape)
    mask = blend_mask(landmarks, box)
    h, w = face_image.shape[:2]
    compositor = Compositor([box], [mask], h, w)
    original = cv2.cvtColor(face_image, cv2.COLOR_BGR2YUV_I420)
    face = np.full((256, 256, 3), (0, 255, 0), np.uint8)  # a green face
    out = compositor.compose(0, original.copy(), face)
    changed = np.argwhere(i420_planes(out, h, w)[0] != i420_planes(original, h, w)[0])
    top = box.y1 + int(np.flatnonzero(mask.any(axis=1))[0])
    assert changed[:, 0].min() >= top - 1 and changed[:, 0].max() < box.y2 + 1
    assert changed[:, 1].min() >= box.x1 - 1 and changed[:, 1].max() < box.x2 + 1
    # Where the mask is full the face is there: green, as decoded back to BGR.
    bgr = cv2.cvtColor(out, cv2.COLOR_YUV2BGR_I420)
    y, x = box.y1 + int(box.height * 0.8), box.x1 + box.width // 2
    assert bgr[y, x, 1] > 200 and bgr[y, x, 2] < 60
    # Outside the mask's rows, the frame's own pixels stay exactly as they were (no colour round trip).
    assert np.array_equal(i420_planes(out, h, w)[0][: top - 2], i420_planes(original, h, w)[0][: top - 2])


def test_empty_mask_and_faceless_frames_leave_the_frame_as_is(face_image):
    h, w = face_image.shape[:2]
    frame = cv2.cvtColor(face_image, cv2.COLOR_BGR2YUV_I420)
    box = FaceBox(100, 100, 200, 220)
    compositor = Compositor([box, None], [np.zeros((120, 100), np.uint8), None], h, w)
    face = np.zeros((256, 256, 3), np.uint8)
    assert np.array_equal(compositor.compose(0, frame.copy(), face), frame)
    assert np.array_equal(compositor.compose(1, frame.copy(), face), frame)
