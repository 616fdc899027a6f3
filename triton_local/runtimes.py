"""Which runtime the local server gives each model, and why (see python_model.py).

On a machine with an NVIDIA GPU that the server environment can use, every model runs in
onnxruntime's CUDA provider, fp32 (MUSETALK_LOCAL_DEVICE: `auto`, the default, uses the GPU
when a probe session in the server environment gets CUDA, and says why not otherwise; `cuda`
insists; `cpu` never). Otherwise, on the CPU:

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
import re
import subprocess
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from contract import cpu
from contract.layout import BF16_GATE_KEY, BF16_PSNR_KEY, model_path, read_metadata
from contract.specs import NETWORKS
from triton_local.repository import Runtime
from triton_local.server import ServerEnvironment

PRECISION = "MUSETALK_CPU_PRECISION"
CHOICES = ("auto", "fp32", "bf16")
BF16 = Runtime("openvino", "bf16")
OPENVINO_FP32 = Runtime("openvino", "f32")
REFERENCE = Runtime()
DEVICE = "MUSETALK_LOCAL_DEVICE"
DEVICES = ("auto", "cpu", "cuda")
NOT_ON_GPU = "; not on the GPU: "
# On a GPU a batch of 32 fits at once: no pieces.
CUDA = Runtime("onnxruntime-cuda", chunk=0)
FASTER_IN_FP32 = {"audio_encoder": (OPENVINO_FP32, "fp32 (OpenVINO: faster than onnxruntime for whisper)")}


@dataclass(frozen=True)
class Choice:
    runtime: Runtime
    why: str  # "fp32 (bf16 gated but this CPU has no native bf16)"


def choose(onnx_repository: Path, precision: str | None = None, capabilities: set[str] | None = None,
           device: str | None = None) -> dict[str, Choice]:
    """Every network's runtime and the reason for it."""
    device = device or os.environ.get(DEVICE, "auto")
    if device not in DEVICES:
        raise ValueError(f"{DEVICE}={device!r}: use one of {', '.join(DEVICES)}")
    if device == "cuda":
        return {n: Choice(CUDA, f"onnxruntime CUDA fp32 on GPU 0 ({DEVICE}=cuda)") for n in NETWORKS}
    not_on_gpu = ""
    if device == "auto" and gpu_visible():
        not_on_gpu = cuda_problem(model_path(onnx_repository, "positional_encoding"))
        if not not_on_gpu:
            return {n: Choice(CUDA, "onnxruntime CUDA fp32 on GPU 0 (an NVIDIA GPU is usable)") for n in NETWORKS}
    choices = _on_the_cpu(onnx_repository, precision, capabilities)
    if not_on_gpu:
        return {n: Choice(c.runtime, f"{c.why}{NOT_ON_GPU}{not_on_gpu}") for n, c in choices.items()}
    return choices


def gpu_visible() -> bool:
    """An NVIDIA GPU's device files are here (the driver is loaded and a GPU is passed through)."""
    return Path("/dev/nvidiactl").exists() and any(Path("/dev").glob("nvidia[0-9]*"))


# Run in the server environment: does the runner its models would get open a model on the
# GPU there? (the same code as python_model.py runs, so the probe cannot pass where it fails)
_PROBE = """
import sys
sys.path.insert(0, sys.argv[1])
from contract.runners import cuda_runner
cuda_runner(sys.argv[2])
print("PROVIDER CUDAExecutionProvider")
"""
REPO = Path(__file__).resolve().parents[1]


@cache
def cuda_problem(onnx_file: Path) -> str:
    """"" where the server environment's onnxruntime runs `onnx_file` on the GPU; else why not."""
    environment = ServerEnvironment()
    try:
        out = subprocess.run([str(environment.venv / "bin" / "python"), "-c", _PROBE, str(REPO), str(onnx_file)],
                             capture_output=True, text=True, timeout=120, env=environment.process_env())
    except (OSError, subprocess.TimeoutExpired) as failed:
        return f"the probe of {environment.venv} failed: {failed}"
    if "PROVIDER CUDAExecutionProvider" in out.stdout:
        return ""
    said = re.sub(r"\x1b\[[0-9;]*m", "", out.stdout + out.stderr).splitlines()
    reason = next((line.strip() for line in said if "Failed to" in line or "not in available" in line),
                  said[-1].strip() if said else "no CUDA provider")
    return (f"{environment.venv}'s onnxruntime cannot use it ({reason[:240]}); install "
            f"onnxruntime-gpu[cuda,cudnn] there, or set {DEVICE}=cpu to stop trying")


def _on_the_cpu(onnx_repository: Path, precision: str | None, capabilities: set[str] | None) -> dict[str, Choice]:
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
    """The startup lines: the CPU (or GPU), and per model what runs and why ("unet: fp32 (bf16
    gated but this CPU has no native bf16)"); why not the GPU, once, where one is visible."""
    if all(choice.runtime == CUDA for choice in choices.values()):
        return "\n".join(["on the GPU:", *(f"  {name}: {choice.why}" for name, choice in choices.items())])
    told = os.environ.get(cpu.OVERRIDE)
    machine = cpu.describe() + (f", taken to do only {told} ({cpu.OVERRIDE})" if told else "")
    whys = {name: choice.why.partition(NOT_ON_GPU) for name, choice in choices.items()}
    gpu = {reason for _, cut, reason in whys.values() if cut}
    return "\n".join([f"on {machine}:", *(f"  {name}: {why}" for name, (why, _, _) in whys.items()),
                      *(f"  not on the GPU: {reason}" for reason in gpu)])
