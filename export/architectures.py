"""Architecture configs of MuseTalk's three weight sets, full size and tiny.

`full` is the real architecture (docs/design/musetalk.md). `tiny` uses the
same classes with small widths, keeping every tensor of the served contract
(`contract.specs`) unchanged, so that tests export and serve all five networks in
seconds with the same config.pbtxt files.
"""
from __future__ import annotations

from contract import specs

PROFILES = ("full", "tiny")

# v1.5 models/musetalkV15/musetalk.json (v1.0 uses the same values).
UNET_FULL = {
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": specs.WHISPER_DIM,
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 2 * specs.LATENT_CHANNELS,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-5,
    "norm_num_groups": 32,
    "out_channels": specs.LATENT_CHANNELS,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
}
# Attention only at 16x16: self-attention over the 32x32 grid would dominate the
# test suite's time while exercising nothing the 16x16 blocks do not.
UNET_TINY = {
    **UNET_FULL,
    "block_out_channels": [32, 64],
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
    "layers_per_block": 1,
    "sample_size": specs.LATENT_SIZE,
}

# stabilityai/sd-vae-ft-mse config.json.
VAE_FULL = {
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": specs.LATENT_CHANNELS,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": specs.FACE_SIZE,
    "scaling_factor": specs.VAE_SCALING_FACTOR,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}
# Four blocks are kept: three downsamplings take 256x256 to the 32x32 latents.
VAE_TINY = {
    **VAE_FULL,
    "block_out_channels": [8, 8, 16, 16],
    "norm_num_groups": 8,
    "layers_per_block": 1,
}

# openai/whisper-tiny config.json (the decoder is loaded with the checkpoint but never exported).
WHISPER_FULL = {
    "d_model": specs.WHISPER_DIM,
    "encoder_layers": 4,
    "encoder_attention_heads": 6,
    "encoder_ffn_dim": 1536,
    "decoder_layers": 4,
    "decoder_attention_heads": 6,
    "decoder_ffn_dim": 1536,
    "num_mel_bins": specs.MEL_BINS,
    "max_source_positions": specs.AUDIO_STEPS,
    "max_target_positions": 448,
    "vocab_size": 51865,
}
# 4 layers and d_model 384 are part of the contract ([B, 1500, 5, 384]); the
# feed-forward width and the unused decoder are what shrink.
WHISPER_TINY = {
    **WHISPER_FULL,
    "encoder_ffn_dim": 64,
    "decoder_layers": 1,
    "decoder_ffn_dim": 64,
    "vocab_size": 64,
    "max_target_positions": 16,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "decoder_start_token_id": 1,
}

ARCHITECTURES = {
    "full": {"unet": UNET_FULL, "vae": VAE_FULL, "whisper": WHISPER_FULL},
    "tiny": {"unet": UNET_TINY, "vae": VAE_TINY, "whisper": WHISPER_TINY},
}
