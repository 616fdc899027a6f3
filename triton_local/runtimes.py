"""Which runtime the local server gives each model (see python_model.py).

fp32 onnxruntime is the reference everywhere. A model runs in OpenVINO bf16
when its ONNX file says the export's reduced-precision gate passed for it (the
unet and vae_decoder: their bf16 chain's decoded face kept >= 35 dB PSNR
against fp32), which roughly halves its cost on CPUs with AVX-512 BF16. The
verdict is read from the file's metadata. The audio_encoder runs in OpenVINO
fp32 (still fp32): 125 ms per call against onnxruntime's 190 ms on 2 cores,
and live sessions call it several times a second. MUSETALK_CPU_PRECISION=fp32
forces the reference (onnxruntime) everywhere.
"""
from __future__ import annotations

import os
from pathlib import Path

from contract.layout import BF16_GATE_KEY, model_path, read_metadata
from contract.specs import NETWORKS
from triton_local.repository import Runtime

BF16 = Runtime("openvino", "bf16")
OPENVINO_FP32 = Runtime("openvino", "f32")
FASTER_IN_FP32 = {"audio_encoder": OPENVINO_FP32}


def runtimes_for(onnx_repository: Path) -> dict[str, Runtime]:
    if os.environ.get("MUSETALK_CPU_PRECISION", "auto") == "fp32":
        return {}
    gated = {name: BF16 for name in NETWORKS if _gate_passed(model_path(onnx_repository, name))}
    return {**FASTER_IN_FP32, **gated}


def _gate_passed(path: Path) -> bool:
    return path.is_file() and read_metadata(path).get(BF16_GATE_KEY) == "pass"


def describe(runtimes: dict[str, Runtime]) -> str:
    if not runtimes:
        return "every model in fp32 (onnxruntime)"
    return ", ".join(f"{n}: {r.name} {r.precision}" for n, r in runtimes.items()) + \
        "; the rest fp32 (onnxruntime)"
