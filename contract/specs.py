"""The tensor contract of every model we serve: declared once, used everywhere.

The ONNX export names its graph inputs and outputs from these specs, the tests
check every `model_repository/*/config.pbtxt` against them (tensors, batch
limits, TensorRT profiles and warm-up), the local server is generated from those
configs, and the client validates arrays before sending. Shapes exclude the
batch dimension, which is always dynamic (Triton's onnxruntime backend requires
a dynamic first dimension when max_batch_size > 0).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# MuseTalk's constants (docs/design/musetalk.md says where each comes from).
SAMPLE_RATE = 16_000
MEL_BINS = 80
MEL_FRAMES = 3000  # 30 s of audio at a 160-sample hop
AUDIO_STEPS = 1500  # whisper encoder steps per 30 s segment: 50 per second
AUDIO_STEPS_PER_SECOND = 50
WHISPER_LAYERS = 5  # embedding output + 4 encoder layers
WHISPER_DIM = 384
CHUNK_STEPS = 10  # audio steps per video frame window
CHUNK_TOKENS = CHUNK_STEPS * WHISPER_LAYERS  # 50 tokens of 384 per frame
FACE_SIZE = 256
LATENT_SIZE = 32
LATENT_CHANNELS = 4
VAE_SCALING_FACTOR = 0.18215


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name: "float32" or "uint8"
    shape: tuple[int, ...]  # without the batch dimension

    @property
    def triton_dtype(self) -> str:
        """The dtype as Triton's config.pbtxt writes it (TYPE_FP32, TYPE_UINT8)."""
        return _TRITON_DTYPES[self.dtype]

    def check(self, array: np.ndarray) -> None:
        """Raise ValueError naming the tensor if `array` breaks the contract."""
        if array.dtype != np.dtype(self.dtype):
            raise ValueError(f"input '{self.name}' must be {self.dtype}, got {array.dtype}")
        if array.ndim != len(self.shape) + 1 or tuple(array.shape[1:]) != self.shape:
            raise ValueError(
                f"input '{self.name}' must have shape [batch, "
                f"{', '.join(map(str, self.shape))}], got {list(array.shape)}"
            )


_TRITON_DTYPES = {"float32": "TYPE_FP32", "uint8": "TYPE_UINT8"}


@dataclass(frozen=True)
class ModelSpec:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    max_batch_size: int

    def input(self, name: str) -> TensorSpec:
        return next(t for t in self.inputs if t.name == name)

    def output(self, name: str) -> TensorSpec:
        return next(t for t in self.outputs if t.name == name)

    @property
    def bytes_per_item(self) -> int:
        """What one item's inputs and outputs weigh together (bytes)."""
        return sum(int(np.prod(t.shape)) * np.dtype(t.dtype).itemsize for t in (*self.inputs, *self.outputs))


def _t(name: str, dtype: str, *shape: int) -> TensorSpec:
    return TensorSpec(name, dtype, tuple(shape))


# The batch limits bound one execution's memory on a GPU (a UNet step at batch
# 32 needs a few GB in fp16) and match upstream's real-time batch of 20 with room
# for the dynamic batcher to merge concurrent users.
AUDIO_ENCODER = ModelSpec(
    "audio_encoder",
    inputs=(_t("input_features", "float32", MEL_BINS, MEL_FRAMES),),
    outputs=(_t("hidden_states", "float32", AUDIO_STEPS, WHISPER_LAYERS, WHISPER_DIM),),
    max_batch_size=8,
)
POSITIONAL_ENCODING = ModelSpec(
    "positional_encoding",
    inputs=(_t("audio_chunk", "float32", CHUNK_TOKENS, WHISPER_DIM),),
    outputs=(_t("audio_embedding", "float32", CHUNK_TOKENS, WHISPER_DIM),),
    max_batch_size=32,
)
UNET = ModelSpec(
    "unet",
    inputs=(
        _t("latents", "float32", 2 * LATENT_CHANNELS, LATENT_SIZE, LATENT_SIZE),
        _t("audio_embedding", "float32", CHUNK_TOKENS, WHISPER_DIM),
    ),
    outputs=(_t("pred_latents", "float32", LATENT_CHANNELS, LATENT_SIZE, LATENT_SIZE),),
    max_batch_size=32,
)
VAE_ENCODER = ModelSpec(
    "vae_encoder",
    inputs=(_t("face_crop", "uint8", FACE_SIZE, FACE_SIZE, 3),),
    outputs=(_t("latents", "float32", 2 * LATENT_CHANNELS, LATENT_SIZE, LATENT_SIZE),),
    max_batch_size=16,
)
VAE_DECODER = ModelSpec(
    "vae_decoder",
    inputs=(_t("pred_latents", "float32", LATENT_CHANNELS, LATENT_SIZE, LATENT_SIZE),),
    outputs=(_t("face", "uint8", FACE_SIZE, FACE_SIZE, 3),),
    max_batch_size=32,
)
# The ensemble: positional_encoding -> unet -> vae_decoder, one frame per item.
MUSETALK = ModelSpec(
    "musetalk",
    inputs=(POSITIONAL_ENCODING.inputs[0], UNET.input("latents")),
    outputs=VAE_DECODER.outputs,
    max_batch_size=min(s.max_batch_size for s in (POSITIONAL_ENCODING, UNET, VAE_DECODER)),
)

NETWORKS = {s.name: s for s in (AUDIO_ENCODER, POSITIONAL_ENCODING, UNET, VAE_ENCODER, VAE_DECODER)}
MODELS = {**NETWORKS, MUSETALK.name: MUSETALK}
