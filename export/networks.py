"""The five MuseTalk networks as export-ready PyTorch modules.

Each wrapper owns the pre/post-processing that the design pushes into the graph
(uint8 in/out for the VAE, the timestep baked into the UNet, the stacked whisper
hidden states), so the exported ONNX file is the whole contract of its
`contract.specs` entry and the front end does no per-pixel maths.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from contract import specs


class AudioEncoder(nn.Module):
    """whisper-tiny's encoder returning its 5 hidden states stacked: [B, 1500, 5, 384].

    The states are the embedding output and the output of each of the 4 layers,
    the last one after the final layer norm: what upstream gets from
    `encoder(x, output_hidden_states=True).hidden_states`. They are collected
    here explicitly rather than through transformers' output-capturing hooks,
    which tracing does not follow reliably; a test proves both agree.
    """

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, input_features: torch.Tensor) -> torch.Tensor:
        enc = self.encoder
        x = nn.functional.gelu(enc.conv1(input_features))
        x = nn.functional.gelu(enc.conv2(x)).permute(0, 2, 1)
        x = x + enc.embed_positions.weight
        states = [x]
        for layer in enc.layers:
            x = layer(x, None)
            states.append(x)
        states[-1] = enc.layer_norm(x)
        return torch.stack(states, dim=2)


class PositionalEncoding(nn.Module):
    """Upstream's sinusoidal encoding (d_model 384, max_len 5000): x + pe[:, :T]."""

    def __init__(self, d_model: int = specs.WHISPER_DIM, max_len: int = 5000):
        super().__init__()
        position = torch.arange(max_len, dtype=torch.float32).unsqueeze(1)
        div_term = torch.exp(
            torch.arange(0, d_model, 2).float() * (-math.log(10000.0) / d_model)
        )
        pe = torch.zeros(max_len, d_model)
        pe[:, 0::2] = torch.sin(position * div_term)
        pe[:, 1::2] = torch.cos(position * div_term)
        self.register_buffer("pe", pe.unsqueeze(0), persistent=False)

    def forward(self, audio_chunk: torch.Tensor) -> torch.Tensor:
        # Decided at trace time: a table of exactly the input's length exports
        # as a plain Add with static shapes, with no slice of a 5000-row table.
        same = self.pe.shape[1] == audio_chunk.shape[1]
        return audio_chunk + (self.pe if same else self.pe[:, : audio_chunk.shape[1]])


class UNet(nn.Module):
    """MuseTalk's UNet at its one and only timestep, 0: one call per frame."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, latents: torch.Tensor, audio_embedding: torch.Tensor) -> torch.Tensor:
        # On the latents' device: a CPU scalar would be a host copy per call on a GPU.
        timestep = torch.zeros((), dtype=latents.dtype, device=latents.device)
        return self.unet(latents, timestep, encoder_hidden_states=audio_embedding).sample


class VaeEncoder(nn.Module):
    """uint8 BGR face crops [B, 256, 256, 3] -> UNet reference latents [B, 8, 32, 32].

    Channels 0-3 encode the crop with its lower half blanked (the region the
    UNet must inpaint), channels 4-7 the whole crop; both are the posterior mean
    times the scaling factor (upstream samples; the mean is deterministic).
    """

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae
        half_mask = torch.ones(1, 1, specs.FACE_SIZE, 1)
        half_mask[:, :, specs.FACE_SIZE // 2 :] = 0
        self.register_buffer("half_mask", half_mask, persistent=False)

    def forward(self, face_crop: torch.Tensor) -> torch.Tensor:
        rgb = face_crop.flip(-1).permute(0, 3, 1, 2).float() / 255.0
        masked = rgb * self.half_mask  # zeroed before normalising: becomes -1
        images = torch.cat([masked, rgb], dim=0) * 2.0 - 1.0
        mean = self.vae.encode(images).latent_dist.mean * specs.VAE_SCALING_FACTOR
        masked_latents, full_latents = mean.chunk(2, dim=0)
        return torch.cat([masked_latents, full_latents], dim=1)


class VaeDecoder(nn.Module):
    """UNet output latents [B, 4, 32, 32] -> the finished uint8 BGR face [B, 256, 256, 3]."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, pred_latents: torch.Tensor) -> torch.Tensor:
        image = self.vae.decode(pred_latents / specs.VAE_SCALING_FACTOR).sample
        image = torch.round((image / 2 + 0.5).clamp(0, 1) * 255)
        return image.to(torch.uint8).permute(0, 2, 3, 1).flip(-1)
