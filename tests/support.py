"""Helpers the test modules share (fixtures live in conftest.py).

Every random input comes from a generator seeded where it is used, so a test's
data never depends on which tests ran before it.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile

from contract.layout import model_path

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).parent / "fixtures"
BUILD = ROOT / "build" / "test"
SPEECH = FIXTURES / "speech.flac"


def speech_seconds(path: Path = SPEECH) -> float:
    """The exact length of a speech fixture, read from the file."""
    info = soundfile.info(str(path))
    return info.frames / info.samplerate


def frames(n: int, seed: int = 7) -> tuple[np.ndarray, np.ndarray]:
    """n frames' worth of ensemble inputs: audio windows [n, 50, 384], latents [n, 8, 32, 32]."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, 50, 384)).astype(np.float32),
            rng.standard_normal((n, 8, 32, 32)).astype(np.float32))


def local_chain(repository: Path, audio: np.ndarray, latents: np.ndarray) -> np.ndarray:
    """The ensemble computed by onnxruntime on the same three ONNX files, chained by hand."""
    import onnxruntime as ort

    run = {n: ort.InferenceSession(str(model_path(repository, n)), providers=["CPUExecutionProvider"])
           for n in ("positional_encoding", "unet", "vae_decoder")}
    embedded = run["positional_encoding"].run(None, {"audio_chunk": audio})[0]
    pred = run["unet"].run(None, {"latents": latents, "audio_embedding": embedded})[0]
    return run["vae_decoder"].run(None, {"pred_latents": pred})[0]


def face_psnr(a: np.ndarray, b: np.ndarray) -> float:
    from export.precision import face_psnr as psnr

    return psnr(a, b)
