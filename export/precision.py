"""The reduced-precision gate: may the CPU server run the per-frame core in bf16?

On a CPU with AVX-512 BF16, OpenVINO's bf16 inference halves the cost of the
UNet and the VAE decoder. It ships only behind a gate on what users see: the
decoded face of the bf16 chain (unet -> vae_decoder) against the fp32 chain
(onnxruntime, itself gated against PyTorch fp32) must keep a PSNR of at least
35 dB. Both files record the measurement and the verdict in their metadata
(contract.layout); the local server follows the verdict.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from contract import specs
from contract.layout import BF16_GATE_KEY, BF16_PSNR_KEY, model_path, read_metadata
from contract.runners import open_runner
from export.metadata import stamp

GATE_DB = 35.0
GATED = ("unet", "vae_decoder")


def face_psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of uint8 images `b` against `a` (peak 255)."""
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0**2 / max(mse, 1e-10)))


def measure_bf16_core(repository: Path, batch: int = 2) -> float:
    """Face PSNR of OpenVINO bf16 (unet -> vae_decoder) against onnxruntime fp32,
    each file opened exactly as the local server opens it."""
    rng = np.random.default_rng(2024)
    feeds = {t.name: rng.standard_normal((batch, *t.shape)).astype(np.float32) for t in specs.UNET.inputs}
    faces = {}
    for runtime, precision in (("onnxruntime", "f32"), ("openvino", "bf16")):
        run = {n: open_runner(model_path(repository, n), runtime, precision) for n in GATED}
        pred = run["unet"](feeds)
        faces[precision] = run["vae_decoder"](pred)["face"]
        del run
    return face_psnr(faces["f32"], faces["bf16"])


def recorded_psnr(repository: Path) -> float | None:
    """The gate's measurement, if both gated files carry the same one."""
    values = set()
    for name in GATED:
        path = model_path(repository, name)
        if not path.is_file():
            return None
        values.add(read_metadata(path).get(BF16_PSNR_KEY))
    value = values.pop() if len(values) == 1 else None
    return float(value) if value else None


def record(repository: Path, psnr: float) -> None:
    """Stamp the measurement and the verdict into both gated files."""
    verdict = "pass" if psnr >= GATE_DB else "fail"
    for name in GATED:
        stamp(model_path(repository, name), {BF16_PSNR_KEY: f"{psnr:.2f}", BF16_GATE_KEY: verdict})


def recorded_verdict(repository: Path) -> str | None:
    """"pass" or "fail" if both gated files carry that verdict, else None."""
    paths = [model_path(repository, n) for n in GATED]
    if not all(p.is_file() for p in paths):
        return None
    verdicts = {read_metadata(p).get(BF16_GATE_KEY) for p in paths}
    return verdicts.pop() if len(verdicts) == 1 else None
