"""The numerical contracts MuseTalk depends on, checked on the exported graphs."""
from __future__ import annotations

import math

import numpy as np
import onnxruntime as ort
import pytest
import torch

from contract import specs
from contract.layout import model_path
from export.checkpoints import WeightSource
from export.networks import AudioEncoder, PositionalEncoding


def session(repo, name):
    return ort.InferenceSession(str(model_path(repo, name)), providers=["CPUExecutionProvider"])


def test_positional_encoding_adds_upstreams_sinusoids(tiny_onnx):
    x = np.random.default_rng(0).standard_normal((2, 50, 384)).astype(np.float32)
    added = session(tiny_onnx, "positional_encoding").run(None, {"audio_chunk": x})[0] - x
    pos, i = np.arange(50)[:, None], np.arange(0, 384, 2)[None, :]
    angle = pos * np.exp(i * (-math.log(10000.0) / 384))
    np.testing.assert_allclose(added[:, :, 0::2], np.broadcast_to(np.sin(angle), (2, 50, 192)), atol=1e-5)
    np.testing.assert_allclose(added[:, :, 1::2], np.broadcast_to(np.cos(angle), (2, 50, 192)), atol=1e-5)
    # ...the same table as upstream's max_len=5000 module.
    upstream = PositionalEncoding()(torch.from_numpy(x)).numpy() - x
    np.testing.assert_allclose(added, upstream, atol=1e-6)


@pytest.fixture(scope="module")
def vae():
    return WeightSource(None, "tiny").load("vae")


def _encode(vae, rgb01: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return (vae.encode(rgb01 * 2 - 1).latent_dist.mean * specs.VAE_SCALING_FACTOR).numpy()


def test_vae_encoder_masks_the_lower_half_and_encodes_both(tiny_onnx, vae, face_image):
    import cv2

    crop = cv2.resize(face_image[60:300, 150:330], (256, 256))[None]  # uint8 BGR
    latents = session(tiny_onnx, "vae_encoder").run(None, {"face_crop": crop})[0]
    rgb = torch.from_numpy(crop[..., ::-1].copy()).permute(0, 3, 1, 2).float() / 255
    masked = rgb.clone()
    masked[:, :, 128:] = 0  # zeroed before normalising: -1 in the VAE's input
    np.testing.assert_allclose(latents[:, :4], _encode(vae, masked), rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(latents[:, 4:], _encode(vae, rgb), rtol=1e-3, atol=1e-4)

    # The masked half sees nothing of the lower half; the full half does.
    other = crop.copy()
    other[:, 128:] = 255 - other[:, 128:]
    changed = session(tiny_onnx, "vae_encoder").run(None, {"face_crop": other})[0]
    np.testing.assert_array_equal(changed[:, :4], latents[:, :4])
    assert np.abs(changed[:, 4:] - latents[:, 4:]).max() > 1e-3


def test_vae_decoder_returns_the_finished_uint8_bgr_face(tiny_onnx, vae):
    z = torch.randn(2, 4, 32, 32)
    with torch.no_grad():
        image = vae.decode(z / specs.VAE_SCALING_FACTOR).sample
    expected = torch.round((image / 2 + 0.5).clamp(0, 1) * 255).to(torch.uint8)
    expected = expected.permute(0, 2, 3, 1).numpy()[..., ::-1]  # HWC, RGB -> BGR
    face = session(tiny_onnx, "vae_decoder").run(None, {"pred_latents": z.numpy()})[0]
    assert face.dtype == np.uint8 and face.shape == (2, 256, 256, 3)
    diff = np.abs(face.astype(int) - expected.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.005


def test_audio_encoder_stacks_the_5_whisper_hidden_states(tiny_onnx):
    encoder = WeightSource(None, "tiny").load("whisper")
    mel = torch.rand(1, 80, 3000) * 2 - 1
    with torch.no_grad():
        upstream = torch.stack(encoder(mel, output_hidden_states=True).hidden_states, dim=2).numpy()
        ours = AudioEncoder(encoder)(mel).numpy()
    assert upstream.shape == (1, 1500, 5, 384)
    np.testing.assert_allclose(ours, upstream, rtol=1e-5, atol=1e-5)
    got = session(tiny_onnx, "audio_encoder").run(None, {"input_features": mel.numpy()})[0]
    np.testing.assert_allclose(got, upstream, rtol=1e-4, atol=1e-4)
    # The last state is after the final layer norm: zero mean, unit variance per step.
    assert abs(float(got[0, :, 4].mean())) < 0.1
