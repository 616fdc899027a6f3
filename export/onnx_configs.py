"""One declarative export config per network, in the manner of optimum's OnnxConfig.

Each config names the `contract.specs` contract it fulfils (tensor names, dtypes,
shapes, hence the dynamic batch axes), the weights it is built from, how to make
sample inputs, and the parity tolerance its export must meet against PyTorch.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from contract import specs
from export import networks, rewrites


@dataclass(frozen=True)
class Tolerance:
    """Largest accepted difference between onnxruntime and PyTorch, per output dtype.

    float outputs: relative L2 error ||onnx - torch|| / ||torch||.
    uint8 outputs: at most `max_levels` apart, on at most `max_fraction` of values
    (rounding x.5 either way is a 1-level flip that fp32 reordering can cause).
    """

    rel_l2: float = 1e-5
    max_levels: int = 1
    max_fraction: float = 0.005


@dataclass(frozen=True)
class OnnxConfig:
    spec: specs.ModelSpec
    component: str | None  # the weights it needs: "whisper", "unet", "vae" or None
    build: Callable[[nn.Module | None], nn.Module]
    sample: Callable[[int, torch.Generator], tuple[torch.Tensor, ...]]
    tolerance: Tolerance = Tolerance()
    # Above protobuf's 2 GB limit the weights must live beside the graph.
    external_data: bool = False
    # Exact rewrites active while exporting (context managers over the module);
    # the parity gate still compares against the original module.
    rewrites: tuple[Callable, ...] = ()

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.spec.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.spec.outputs]

    @property
    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        return {name: {0: "batch"} for name in self.input_names + self.output_names}


def _randn(*shape: int):
    return lambda batch, gen: (torch.randn(batch, *shape, generator=gen),)


def _unet_inputs(batch: int, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    return tuple(torch.randn(batch, *t.shape, generator=gen) for t in specs.UNET.inputs)


def _face_crops(batch: int, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    shape = (batch, *specs.VAE_ENCODER.inputs[0].shape)
    return (torch.randint(0, 256, shape, generator=gen, dtype=torch.uint8),)


def _log_mel(batch: int, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    # Whisper's normalised log-mel lies in about [-1, 1.5].
    return (torch.rand(batch, specs.MEL_BINS, specs.MEL_FRAMES, generator=gen) * 2.5 - 1,)


CONFIGS = {
    c.name: c
    for c in (
        OnnxConfig(specs.AUDIO_ENCODER, "whisper", networks.AudioEncoder, _log_mel,
                   Tolerance(rel_l2=1e-5)),
        OnnxConfig(specs.POSITIONAL_ENCODING, None, lambda _: networks.PositionalEncoding(max_len=specs.CHUNK_TOKENS),
                   _randn(*specs.POSITIONAL_ENCODING.inputs[0].shape), Tolerance(rel_l2=1e-6)),
        OnnxConfig(specs.UNET, "unet", networks.UNet, _unet_inputs,
                   Tolerance(rel_l2=1e-5), external_data=True,
                   rewrites=(rewrites.subpixel_upsampling,)),
        # The masked half (a constant -1 block) is ill-conditioned in fp32:
        # PyTorch fp32 itself is 2.5e-4 (full) to 1e-3 (tiny) from a float64
        # run on it, and onnxruntime lands closer to float64 (1e-4) than that.
        OnnxConfig(specs.VAE_ENCODER, "vae", networks.VaeEncoder, _face_crops,
                   Tolerance(rel_l2=2e-3)),
        OnnxConfig(specs.VAE_DECODER, "vae", networks.VaeDecoder,
                   _randn(*specs.VAE_DECODER.inputs[0].shape),
                   rewrites=(rewrites.subpixel_upsampling,)),
    )
}
