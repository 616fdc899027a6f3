"""Which runtime the local server gives each model (see python_model.py).

fp32 onnxruntime is the reference everywhere. A model runs in OpenVINO bf16
when its ONNX file says the export's reduced-precision gate passed for it (the
unet and vae_decoder: their bf16 chain's decoded face kept >= 35 dB PSNR
against fp32), which roughly halves its cost on CPUs with AVX-512 BF16. The
verdict is read from the file's metadata; MUSETALK_CPU_PRECISION=fp32 forces
the reference.
"""
from __future__ import annotations

import os
from pathlib import Path

from contract.layout import BF16_GATE_KEY, model_path, read_metadata
from contract.specs import NETWORKS
from triton_local.repository import Runtime

BF16 = Runtime("openvino", "bf16")


def runtimes_for(onnx_repository: Path) -> dict[str, Runtime]:
    if os.environ.get("MUSETALK_CPU_PRECISION", "auto") == "fp32":
        return {}
    return {name: BF16 for name in NETWORKS if _gate_passed(model_path(onnx_repository, name))}


def _gate_passed(path: Path) -> bool:
    return path.is_file() and read_metadata(path).get(BF16_GATE_KEY) == "pass"


def describe(runtimes: dict[str, Runtime]) -> str:
    if not runtimes:
        return "every model in fp32 (onnxruntime)"
    return ", ".join(f"{n}: {r.name} {r.precision}" for n, r in runtimes.items()) + \
        "; the rest fp32 (onnxruntime)"
