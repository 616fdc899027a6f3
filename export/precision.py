"""The reduced-precision gate: may the CPU server run the per-frame core in bf16?

On a CPU with AVX-512 BF16, OpenVINO's bf16 inference halves the cost of the
UNet and the VAE decoder. It ships only behind a gate on what users see: the
decoded face of the bf16 chain (unet -> vae_decoder) against the fp32 chain
(onnxruntime, itself gated against PyTorch fp32) must keep a PSNR of at least
35 dB. The verdict is recorded in both ONNX files' metadata, where the local
server's repository generator reads it.
"""
from __future__ import annotations

import numpy as np
import onnx

from client import specs
from export.layout import DATA_FILE, model_path

GATE_DB = 35.0
PSNR_KEY = "musetalk.cpu_bf16_face_psnr_db"
GATED = ("unet", "vae_decoder")


def face_psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0**2 / max(mse, 1e-10)))


def measure_bf16_core(repository, batch: int = 2) -> float:
    """Face PSNR of OpenVINO bf16 (unet -> vae_decoder) against onnxruntime fp32."""
    import onnxruntime as ort
    import openvino as ov

    rng = np.random.default_rng(2024)
    latents = rng.standard_normal((batch, *specs.UNET.input("latents").shape)).astype(np.float32)
    audio = rng.standard_normal((batch, *specs.UNET.input("audio_embedding").shape)).astype(np.float32)
    feeds = {"latents": latents, "audio_embedding": audio}
    faces = {}
    for precision in ("fp32", "bf16"):
        if precision == "fp32":
            run = {n: _ort(ort, model_path(repository, n)) for n in GATED}
        else:
            run = {n: _openvino(ov, model_path(repository, n)) for n in GATED}
        pred = run["unet"](feeds)
        faces[precision] = run["vae_decoder"]({"pred_latents": pred})
        del run
    return face_psnr(faces["fp32"], faces["bf16"])


def _ort(ort, path):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda feeds: session.run(None, feeds)[0]


def _openvino(ov, path):
    compiled = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "bf16"})
    request = compiled.create_infer_request()
    return lambda feeds: np.array(request.infer(feeds)[compiled.outputs[0]])


def recorded_psnr(repository) -> float | None:
    """The gate's measurement, if both gated files carry the same one."""
    values = set()
    for name in GATED:
        path = model_path(repository, name)
        if not path.is_file():
            return None
        meta = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
        values.add(meta.get(PSNR_KEY))
    value = values.pop() if len(values) == 1 else None
    return float(value) if value else None


def record(repository, psnr: float) -> None:
    for name in GATED:
        path = model_path(repository, name)
        external = (path.parent / DATA_FILE).exists()
        # Weights kept beside the graph stay where they are: only the graph is rewritten.
        model = onnx.load(str(path), load_external_data=not external)
        meta = {p.key: p.value for p in model.metadata_props}
        meta[PSNR_KEY] = f"{psnr:.2f}"
        del model.metadata_props[:]
        for key, value in meta.items():
            model.metadata_props.add(key=key, value=value)
        partial = path.with_name("model.onnx.partial")
        onnx.save_model(model, str(partial))
        partial.replace(path)  # atomic: never a half-written graph


def bf16_allowed(repository) -> bool:
    psnr = recorded_psnr(repository)
    return psnr is not None and psnr >= GATE_DB
