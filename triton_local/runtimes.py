"""Which runtime the local server gives each model, and why (see python_model.py).

fp32 onnxruntime is the reference everywhere. The unet and the vae_decoder run in
OpenVINO bf16 only where both hold:

- the export's gate passed for them (their bf16 chain's decoded face kept >= 35 dB PSNR
  against fp32; the verdict is read from the files' metadata), and
- this CPU runs bf16 natively (OpenVINO lists BF16 among its capabilities: AVX512-BF16 or
  AMX). There bf16 roughly halves their cost; elsewhere it is emulated, many times slower
  than fp32 (a Xeon with AVX-512 but no AVX512-BF16 did not finish one full-size unet batch
  in five minutes).

The audio_encoder runs in OpenVINO fp32 (still fp32): 125 ms per call against onnxruntime's
190 ms on 2 cores of an AMD EPYC, and live sessions call it several times a second.

MUSETALK_CPU_PRECISION: `auto` (the default: the rules above), `fp32` (the reference
everywhere), `bf16` (bf16 wherever the gate passed, whatever the CPU: to measure it).
MUSETALK_CPU_CAPABILITIES overrides what the CPU is believed to do (contract.cpu).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from contract import cpu
from contract.layout import BF16_GATE_KEY, BF16_PSNR_KEY, model_path, read_metadata
from contract.specs import NETWORKS
from triton_local.repository import Runtime

PRECISION = "MUSETALK_CPU_PRECISION"
CHOICES = ("auto", "fp32", "bf16")
BF16 = Runtime("openvino", "bf16")
OPENVINO_FP32 = Runtime("openvino", "f32")
REFERENCE = Runtime()
FASTER_IN_FP32 = {"audio_encoder": (OPENVINO_FP32, "fp32 (OpenVINO: faster than onnxruntime for whisper)")}


@dataclass(frozen=True)
class Choice:
    runtime: Runtime
    why: str  # "fp32 (bf16 gated but this CPU has no native bf16)"


def choose(onnx_repository: Path, precision: str | None = None,
           capabilities: set[str] | None = None) -> dict[str, Choice]:
    """Every network's runtime and the reason for it."""
    precision = precision or os.environ.get(PRECISION, "auto")
    if precision not in CHOICES:
        raise ValueError(f"{PRECISION}={precision!r}: use one of {', '.join(CHOICES)}")
    if precision == "fp32":
        return {n: Choice(REFERENCE, f"fp32 ({PRECISION}=fp32)") for n in NETWORKS}
    native_bf16 = "BF16" in (cpu.capabilities() if capabilities is None else capabilities)
    choices = {}
    for name in NETWORKS:
        gate = _gate(model_path(onnx_repository, name))
        if name in FASTER_IN_FP32:
            choices[name] = Choice(*FASTER_IN_FP32[name])
        elif gate is None:
            choices[name] = Choice(REFERENCE, "fp32")
        elif not gate[0]:
            choices[name] = Choice(REFERENCE, f"fp32 (bf16 failed its gate: {gate[1]})")
        elif precision == "bf16" and not native_bf16:
            choices[name] = Choice(BF16, f"bf16 ({PRECISION}=bf16, although this CPU has no native bf16)")
        elif native_bf16:
            choices[name] = Choice(BF16, f"bf16 (gate passed: {gate[1]}; this CPU has native bf16)")
        else:
            choices[name] = Choice(REFERENCE, "fp32 (bf16 gated but this CPU has no native bf16)")
    return choices


def runtimes_for(onnx_repository: Path, **kwargs) -> dict[str, Runtime]:
    return {name: choice.runtime for name, choice in choose(onnx_repository, **kwargs).items()}


def _gate(path: Path) -> tuple[bool, str] | None:
    """(passed, "45.1 dB face PSNR") where the file records a bf16 gate; None where it records none."""
    if not path.is_file():
        return None
    metadata = read_metadata(path)
    verdict = metadata.get(BF16_GATE_KEY)
    if verdict is None:
        return None
    return verdict == "pass", f"{metadata.get(BF16_PSNR_KEY, '?')} dB face PSNR"


def describe(choices: dict[str, Choice]) -> str:
    """The startup lines: the CPU, and per model what runs and why ("unet: fp32 (bf16 gated but
    this CPU has no native bf16)")."""
    told = os.environ.get(cpu.OVERRIDE)
    machine = cpu.describe() + (f", taken to do only {told} ({cpu.OVERRIDE})" if told else "")
    return "\n".join([f"on {machine}:", *(f"  {name}: {choice.why}" for name, choice in choices.items())])
