"""Which runtime the local server gives each model (see python_model.py).

fp32 onnxruntime is the reference everywhere. The per-frame core (unet and
vae_decoder) runs in OpenVINO bf16 when the export's reduced-precision gate
passed (decoded face >= 35 dB PSNR against fp32; export/precision.py), which
roughly halves its cost on CPUs with AVX-512 BF16. MUSETALK_CPU_PRECISION=fp32
forces the reference.
"""
from __future__ import annotations

import os
from pathlib import Path

from export.precision import GATED, bf16_allowed
from triton_local.repository import Runtime

BF16 = Runtime("openvino", "bf16")


def runtimes_for(onnx_repository: Path) -> dict[str, Runtime]:
    if os.environ.get("MUSETALK_CPU_PRECISION", "auto") == "fp32":
        return {}
    return {name: BF16 for name in GATED} if bf16_allowed(onnx_repository) else {}


def describe(runtimes: dict[str, Runtime]) -> str:
    if not runtimes:
        return "every model in fp32 (onnxruntime)"
    return ", ".join(f"{n}: {r.name} {r.precision}" for n, r in runtimes.items()) + \
        "; the rest fp32 (onnxruntime)"
