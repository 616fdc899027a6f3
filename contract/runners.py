"""How an exported ONNX file runs outside Triton's own onnxruntime backend.

The local server's python-backend model, the export's bf16 gate and the
benchmarks all open files through `open_runner`, so the gate measures exactly
what the local server then serves. A runner maps input arrays by name to output
arrays by name.

  runtime "onnxruntime": the CPU execution provider (fp32, the reference).
  runtime "openvino": OpenVINO on the CPU with an inference precision hint,
      "f32" or "bf16" (AVX-512 BF16 / AMX halve the UNet and VAE decoder's cost).
  runtime "onnxruntime-cuda": onnxruntime-gpu's CUDA provider on GPU 0, precision "f32"
      (strict fp32) or "tf32" (fp32 through TF32 tensor cores).

Only numpy is imported here; the runtimes are imported when used, so this
module also loads inside the local server's own environment (numpy<2).
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

Runner = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]


def onnxruntime_runner(path: Path, threads: int = 0, providers: list | None = None, spin: bool = True) -> Runner:
    """onnxruntime on the CPU (default), or with the given execution providers (CUDA, TensorRT).

    `spin=False` makes idle worker threads sleep instead of spinning between operators: where
    several models share the cores (the local server's models run in processes of their own),
    a spinning pool takes the cores another model is computing on."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    if not spin:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    # Without the arena, a batch's activations (GBs for the VAE at 256x256) go
    # back to the system after the call instead of staying reserved for ever.
    options.enable_cpu_mem_arena = False
    session = ort.InferenceSession(str(path), options, providers=providers or ["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return lambda feeds: dict(zip(names, session.run(names, feeds)))


def cuda_runner(path: Path, precision: str = "f32") -> Runner:
    """onnxruntime's CUDA provider on GPU 0, numpy in and out: what the local server runs on a GPU.

    onnxruntime-gpu finds the CUDA and cuDNN libraries in NVIDIA's pip wheels (PyTorch's, or
    `onnxruntime-gpu[cuda,cudnn]`) once preloaded; without them it would quietly fall back to
    the CPU, which is refused here with what it said."""
    import onnxruntime as ort

    if precision not in ("f32", "tf32"):
        raise ValueError(f"onnxruntime-cuda precision {precision!r}: use f32 or tf32")
    ort.preload_dlls()
    cuda = ("CUDAExecutionProvider", {"device_id": "0", "use_tf32": "1" if precision == "tf32" else "0"})
    session = ort.InferenceSession(str(path), providers=[cuda])
    if session.get_providers()[0] != "CUDAExecutionProvider":
        raise RuntimeError(f"onnxruntime could not use CUDA for {path} (it offered {session.get_providers()}): "
                           "is an NVIDIA GPU visible, and are the CUDA 13 and cuDNN 9 libraries installed "
                           "(pip install 'onnxruntime-gpu[cuda,cudnn]')?")
    names = [o.name for o in session.get_outputs()]
    return lambda feeds: dict(zip(names, session.run(names, feeds)))


def openvino_runner(path: Path, precision: str = "f32", threads: int = 0) -> Runner:
    import openvino as ov

    config = {"INFERENCE_PRECISION_HINT": precision}
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    compiled = ov.Core().compile_model(str(path), "CPU", config)
    request = compiled.create_infer_request()

    def run(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        results = request.infer(feeds)
        return {out.get_any_name(): np.array(results[out]) for out in compiled.outputs}

    return run


RUNTIMES = ("onnxruntime", "openvino", "onnxruntime-cuda")


def open_runner(path: Path, runtime: str = "onnxruntime", precision: str = "f32",
                threads: int = 0, spin: bool = True) -> Runner:
    """A runner for the ONNX file at `path` (precision applies to OpenVINO and CUDA, threads and
    `spin` to the CPU)."""
    if runtime == "onnxruntime":
        return onnxruntime_runner(path, threads, spin=spin)
    if runtime == "openvino":
        return openvino_runner(path, precision, threads)
    if runtime == "onnxruntime-cuda":
        return cuda_runner(path, precision)
    raise ValueError(f"unknown runtime {runtime!r}; use one of {', '.join(RUNTIMES)}")
