"""Where the weights come from: MuseTalk's checkpoint layout, or random values.

The real layout is what upstream's download_weights.sh leaves under models/:

    musetalkV15/unet.pth + musetalkV15/musetalk.json     (v1.5)
    musetalk/pytorch_model.bin + musetalk/musetalk.json  (v1.0)
    sd-vae/config.json + diffusion_pytorch_model.{safetensors,bin}
    whisper/config.json + {model.safetensors,pytorch_model.bin}

A missing or unreadable file is a CheckpointError that names it and says where
to download it; there is never a silent fallback to random weights.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from export.architectures import ARCHITECTURES

COMPONENTS = ("whisper", "unet", "vae")
UNET_FILES = {
    "v15": ("musetalkV15", "unet.pth"),
    "v1": ("musetalk", "pytorch_model.bin"),
}
_DOWNLOAD = {
    "unet": "huggingface-cli download TMElyralab/MuseTalk --local-dir {root} "
    "--include '{folder}/musetalk.json' '{folder}/{weights}'",
    "vae": "huggingface-cli download stabilityai/sd-vae-ft-mse --local-dir {root}/sd-vae "
    "--include config.json diffusion_pytorch_model.bin",
    "whisper": "huggingface-cli download openai/whisper-tiny --local-dir {root}/whisper "
    "--include config.json pytorch_model.bin preprocessor_config.json",
}


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, truncated or does not fit the architecture."""


@dataclass(frozen=True)
class WeightSource:
    """The weights of one export run: a checkpoint directory, or random values."""

    weights_dir: Path | None
    profile: str = "full"
    version: str = "v15"
    seed: int = 0

    @property
    def synthetic(self) -> bool:
        return self.weights_dir is None

    def files(self, component: str) -> list[Path]:
        """The checkpoint files `component` is read from (config first), checked to exist."""
        root = self.weights_dir
        if component == "unet":
            folder, weights = UNET_FILES[self.version]
            wanted = [[root / folder / "musetalk.json"], [root / folder / weights]]
        elif component == "vae":
            d = root / "sd-vae"
            wanted = [[d / "config.json"],
                      [d / "diffusion_pytorch_model.safetensors", d / "diffusion_pytorch_model.bin"]]
        else:
            d = root / "whisper"
            wanted = [[d / "config.json"], [d / "model.safetensors", d / "pytorch_model.bin"]]
        found = []
        for alternatives in wanted:
            present = [p for p in alternatives if p.is_file()]
            if not present:
                names = " or ".join(str(p) for p in alternatives)
                raise CheckpointError(f"missing checkpoint file: {names}\n  {self._how_to_get(component)}")
            found.append(present[0])
        return found

    def describe(self, component: str) -> dict:
        """What identifies these weights: recorded in the ONNX metadata, and the skip key."""
        if self.synthetic:
            return {"weights": "synthetic", "profile": self.profile, "seed": self.seed,
                    "architecture": ARCHITECTURES[self.profile][component]}
        return {
            "weights": "checkpoint",
            "version": self.version,
            "files": [
                {"path": str(p), "bytes": p.stat().st_size, "mtime_ns": p.stat().st_mtime_ns}
                for p in self.files(component)
            ],
        }

    def load(self, component: str) -> nn.Module:
        """The PyTorch module of `component` ("whisper" encoder, "unet" or "vae"), in eval mode."""
        if component not in COMPONENTS:
            raise ValueError(f"unknown component {component!r}; expected one of {COMPONENTS}")
        module = self._random(component) if self.synthetic else self._checkpoint(component)
        return module.eval().requires_grad_(False)

    def _random(self, component: str) -> nn.Module:
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import WhisperConfig
        from transformers.models.whisper.modeling_whisper import WhisperEncoder

        torch.manual_seed(self.seed)
        config = ARCHITECTURES[self.profile][component]
        if component == "unet":
            return UNet2DConditionModel.from_config(config)
        if component == "vae":
            return AutoencoderKL.from_config(config)
        return WhisperEncoder(WhisperConfig(**config))

    def _checkpoint(self, component: str) -> nn.Module:
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import WhisperModel

        config_file, weights_file = self.files(component)
        try:
            if component == "unet":
                # Upstream: UNet2DConditionModel(**json) then load_state_dict(torch.load(path)).
                model = UNet2DConditionModel.from_config(json.loads(config_file.read_text()))
                model.load_state_dict(_torch_load(weights_file))
                return model
            if component == "vae":
                # local_files_only: a folder on disk, never a try of the network.
                return AutoencoderKL.from_pretrained(config_file.parent, local_files_only=True)
            return WhisperModel.from_pretrained(config_file.parent, local_files_only=True).encoder
        except Exception as error:  # noqa: BLE001 - every failure gets the file's name
            raise CheckpointError(
                f"cannot load {weights_file} (with {config_file.name}): {type(error).__name__}: "
                f"{str(error).splitlines()[0] if str(error) else ''}\n"
                f"  The file may be truncated or from another model. {self._how_to_get(component)}"
            ) from error

    def _how_to_get(self, component: str) -> str:
        folder, weights = UNET_FILES[self.version]
        command = _DOWNLOAD[component].format(root=self.weights_dir, folder=folder, weights=weights)
        return f"Get it with: {command}"


def _torch_load(path: Path) -> dict:
    # mmap avoids holding a second 3.4 GB copy of the UNet while it is copied in.
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as error:
        if "mmap" not in str(error):
            raise
        return torch.load(path, map_location="cpu", weights_only=True)
