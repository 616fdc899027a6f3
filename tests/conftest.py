"""Shared fixtures: tiny-profile ONNX exports, a REAL local tritonserver, real media.

Everything here is the real thing at a small size: the tiny profile has the
same classes and tensor contracts as the full models; the server is
tritonserver from the nvidia-pytriton wheel; the face is a photograph from
scikit-image; the speech was spoken by espeak-ng.
"""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from export.__main__ import main as export_main
from support import BUILD, SPEECH
from triton_local.repository import generate
from triton_local.server import LocalTriton, Ports

TINY_ONNX = BUILD / "tiny_onnx"


@pytest.fixture(scope="session")
def tiny_onnx():
    """The five networks exported in the tiny profile (re-exported only when stale)."""
    assert export_main(["--synthetic", "--profile", "tiny", "--repository", str(TINY_ONNX)]) == 0
    return TINY_ONNX


@pytest.fixture(scope="session")
def triton(tiny_onnx) -> LocalTriton:
    """A real tritonserver serving the tiny models through the generated local repository."""
    repository = BUILD / "triton_repository"
    generate(repository, tiny_onnx)
    server = LocalTriton(repository, Ports.free(), log_file=BUILD / "triton.log")
    server.start(timeout=300)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def speech_bytes() -> bytes:
    """5.6 s of real English speech (espeak-ng), 22.05 kHz mono FLAC."""
    return SPEECH.read_bytes()


@pytest.fixture(scope="session")
def face_image() -> np.ndarray:
    """A real photograph of a face (BGR): scikit-image's astronaut (Eileen Collins)."""
    import skimage.data

    return cv2.cvtColor(skimage.data.astronaut(), cv2.COLOR_RGB2BGR)


@pytest.fixture(scope="session")
def face_png(face_image) -> bytes:
    return cv2.imencode(".png", face_image)[1].tobytes()
