"""Face landmarks and upstream's face box rule.

Upstream finds 68 iBUG landmarks per frame (DWPose) and derives the face box
from them. dlib's 68-point shape predictor gives the same 68-point scheme, and
its weights ship inside the `face_recognition_models` wheel, so nothing is
downloaded at run time. (Its training data, iBUG 300-W, is licensed for
research; swap the predictor for a commercially licensed one where that matters.)
"""
from __future__ import annotations

import importlib.util
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

NOSE = 29  # landmark the top of the box is mirrored around
# dlib's HOG detector finds faces of about 80 px and more, at a cost that grows with
# the pixel count. It runs first on the frame scaled to 640 px (cheap: finds the
# large faces), then, only where that finds nothing, at the scale where the
# smallest faces we promise (64 px, jaw to jaw) measure 80 px.
DETECT_SIDE = 640
HOG_FACE = 80
SMALLEST_FACE = 64


@dataclass(frozen=True)
class FaceBox:
    x1: int
    y1: int
    x2: int
    y2: int

    @property
    def width(self) -> int:
        return self.x2 - self.x1

    @property
    def height(self) -> int:
        return self.y2 - self.y1

    def as_tuple(self) -> tuple[int, int, int, int]:
        return (self.x1, self.y1, self.x2, self.y2)


def face_box(landmarks: np.ndarray, frame_shape: tuple[int, ...], bbox_shift: int = 0,
             extra_margin: int = 10) -> FaceBox | None:
    """Upstream's box from 68 landmarks (musetalk/utils/preprocessing.py, v1.5).

    x from the landmarks' extent; bottom at the lowest landmark (the chin) plus
    `extra_margin` (v1.5); top mirrored around the nose (landmark 29), which
    `bbox_shift` (v1.0's knob) moves down (+) or up (-). None if degenerate.
    """
    lm = landmarks.astype(np.int32)
    height, width = frame_shape[:2]
    nose_y = lm[NOSE, 1] + bbox_shift
    bottom = lm[:, 1].max()
    top = max(0, nose_y - (bottom - nose_y))
    x1, x2 = max(0, int(lm[:, 0].min())), min(width, int(lm[:, 0].max()))
    y2 = min(height, int(bottom) + extra_margin)
    if x2 - x1 <= 1 or y2 - int(top) <= 1:
        return None
    return FaceBox(x1, int(top), x2, y2)


def _predictor_file() -> Path:
    # Located without importing face_recognition_models, whose __init__ needs
    # pkg_resources (gone from recent setuptools).
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("face_recognition_models is not installed (pip install face_recognition_models)")
    return Path(spec.submodule_search_locations[0]) / "models" / "shape_predictor_68_face_landmarks.dat"


class LandmarkFinder:
    """68 landmarks of the largest face in a BGR frame, or None when there is none.

    Thread-safe (dlib's objects are not: calls are serialised). Remembers the
    last face so that consecutive video frames search near it first.
    """

    _lock = threading.Lock()
    _models = None

    def __init__(self):
        self._previous: tuple[int, int, int, int] | None = None
        self.seconds = {"detection": 0.0, "landmarks": 0.0}  # where the time went

    @classmethod
    def _load(cls):
        if cls._models is None:
            import dlib

            cls._models = (dlib.get_frontal_face_detector(), dlib.shape_predictor(str(_predictor_file())))
        return cls._models

    def find(self, frame: np.ndarray) -> np.ndarray | None:
        with self._lock:
            detector, predictor = self._load()
            started = time.perf_counter()
            gray = cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY)
            rect = self._detect_near_previous(detector, gray) or self._detect(detector, gray)
            found = time.perf_counter()
            self.seconds["detection"] += found - started
            if rect is None:
                self._previous = None
                return None
            import dlib

            shape = predictor(gray, dlib.rectangle(*rect))
            self._previous = rect
            self.seconds["landmarks"] += time.perf_counter() - found
            return np.array([(p.x, p.y) for p in shape.parts()], dtype=np.float32)

    def _detect(self, detector, gray: np.ndarray):
        """The largest face: cheap pass first, the small-face pass only if it finds none."""
        cheap = min(1.0, DETECT_SIDE / max(gray.shape))
        rect = _largest(detector, gray, cheap)
        fine = HOG_FACE / SMALLEST_FACE
        if rect is None and fine > cheap * 1.2:
            rect = _largest(detector, gray, fine)
        return rect

    def _detect_near_previous(self, detector, gray: np.ndarray):
        """Around the last face, scaled so that a face of its size measures about 2x HOG's
        minimum: consecutive frames cost a small window whatever the frame's size."""
        if self._previous is None:
            return None
        x1, y1, x2, y2 = self._previous
        w, h = x2 - x1, y2 - y1
        left, top = max(0, x1 - w), max(0, y1 - h)
        roi = gray[top : y2 + h, left : x2 + w]
        if not roi.size:
            return None
        rect = _largest(detector, roi, min(4.0, 2 * HOG_FACE / max(w, 1)))
        return None if rect is None else (rect[0] + left, rect[1] + top, rect[2] + left, rect[3] + top)


def _largest(detector, gray: np.ndarray, scale: float):
    """The largest face HOG finds in `gray` scaled by `scale`, in `gray`'s coordinates."""
    interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    image = cv2.resize(gray, None, fx=scale, fy=scale, interpolation=interpolation) if scale != 1 else gray
    rects = detector(image, 0)
    if not rects:
        return None
    r = max(rects, key=lambda r: r.width() * r.height())
    return tuple(int(v / scale) for v in (r.left(), r.top(), r.right(), r.bottom()))
