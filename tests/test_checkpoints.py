"""Loading MuseTalk's real checkpoint layout (written here with random values), and its errors."""
from __future__ import annotations

import json
import shutil

import numpy as np
import onnxruntime as ort
import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import WhisperConfig, WhisperModel

from contract.layout import model_path
from export.__main__ import main as export_main
from export.architectures import ARCHITECTURES
from export.checkpoints import CheckpointError, WeightSource
from export.networks import AudioEncoder

TINY = ARCHITECTURES["tiny"]


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """models/ as upstream's download_weights.sh leaves it, tiny and random."""
    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(123)
    unet = UNet2DConditionModel.from_config(TINY["unet"])
    config = {"_class_name": "UNet2DConditionModel", "_diffusers_version": "0.6.0", **TINY["unet"]}
    for folder, name in (("musetalkV15", "unet.pth"), ("musetalk", "pytorch_model.bin")):
        (root / folder).mkdir()
        (root / folder / "musetalk.json").write_text(json.dumps(config))
        torch.save(unet.state_dict(), root / folder / name)
    AutoencoderKL.from_config(TINY["vae"]).save_pretrained(root / "sd-vae")
    WhisperModel(WhisperConfig(**TINY["whisper"])).save_pretrained(root / "whisper")
    return root, unet


def copy_of(weights, tmp_path):
    """A copy of the checkpoint folder that a test may damage."""
    copy = tmp_path / "models"
    shutil.copytree(weights[0], copy)
    return copy


@pytest.mark.parametrize("version", ["v15", "v1"])
def test_unet_loads_the_checkpoint_not_random_values(weights, version):
    root, original = weights
    loaded = WeightSource(root, version=version).load("unet")
    for (name, a), (_, b) in zip(original.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name


def test_export_from_checkpoints_reproduces_their_outputs(weights, tmp_path):
    root, original = weights
    repo = tmp_path / "repo"
    assert export_main(["--weights", str(root), "--repository", str(repo),
                        "--models", "unet,audio_encoder,vae_decoder"]) == 0
    # The UNet graph computes the checkpoint's UNet at t=0.
    latents, audio = torch.randn(2, 8, 32, 32), torch.randn(2, 50, 384)
    with torch.no_grad():
        expected = original(latents, 0, encoder_hidden_states=audio).sample.numpy()
    unet = ort.InferenceSession(str(model_path(repo, "unet")), providers=["CPUExecutionProvider"])
    got = unet.run(None, {"latents": latents.numpy(), "audio_embedding": audio.numpy()})[0]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    # The whisper graph computes the checkpoint's encoder.
    encoder = WhisperModel.from_pretrained(root / "whisper").encoder.eval()
    mel = torch.rand(1, 80, 3000) * 2 - 1
    with torch.no_grad():
        want = AudioEncoder(encoder)(mel).numpy()
    session = ort.InferenceSession(str(model_path(repo, "audio_encoder")), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {"input_features": mel.numpy()})[0], want,
                               rtol=1e-4, atol=1e-4)
    assert (repo / "vae_decoder" / "1" / "model.onnx").is_file()


@pytest.mark.parametrize("component, missing", [
    ("unet", "musetalkV15/unet.pth"),
    ("unet", "musetalkV15/musetalk.json"),
    ("vae", "sd-vae/config.json"),
    ("whisper", "whisper/config.json"),
])
def test_missing_file_is_named_with_how_to_get_it(weights, tmp_path, component, missing):
    copy = copy_of(weights, tmp_path)
    (copy / missing).unlink()
    with pytest.raises(CheckpointError) as error:
        WeightSource(copy).load(component)
    assert missing in str(error.value)
    assert "huggingface-cli download" in str(error.value)


@pytest.mark.parametrize("component, damaged", [
    ("unet", "musetalkV15/unet.pth"),
    ("vae", "sd-vae/diffusion_pytorch_model.safetensors"),
    ("whisper", "whisper/model.safetensors"),
])
def test_truncated_file_is_named(weights, tmp_path, component, damaged):
    copy = copy_of(weights, tmp_path)
    data = (copy / damaged).read_bytes()
    (copy / damaged).write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError) as error:
        WeightSource(copy).load(component)
    assert damaged in str(error.value) and "truncated" in str(error.value)


def test_checkpoint_of_another_architecture_is_refused(weights, tmp_path):
    copy = copy_of(weights, tmp_path)
    config = json.loads((copy / "musetalkV15" / "musetalk.json").read_text())
    config["block_out_channels"] = [64, 128]
    (copy / "musetalkV15" / "musetalk.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="unet.pth"):
        WeightSource(copy).load("unet")
