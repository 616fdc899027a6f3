"""Generate the local server's model repository from model_repository/.

Every model keeps its name, tensors, max_batch_size, dynamic batching and the
ensemble exactly as the GPU configs declare them. What changes is only what a
CPU-only machine without the onnxruntime backend needs: the python backend
(python_model.py running the same ONNX file), a CPU instance, no TensorRT
accelerator, and a warm-up at batch 1 instead of the engine builds at batch 32.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from contract import specs
from contract.layout import SYNTHETIC_KEY, model_path, read_metadata

PROJECT_ROOT = Path(__file__).resolve().parent.parent
SOURCE = PROJECT_ROOT / "model_repository"
PYTHON_MODEL = Path(__file__).resolve().parent / "python_model.py"


@dataclass(frozen=True)
class Runtime:
    """How the local server runs one ONNX model (see python_model.py)."""

    name: str = "onnxruntime"
    precision: str = "f32"
    threads: int = 0
    # Largest batch run at once; bigger batches run in pieces (see python_model.py).
    # 8 keeps the server under 12 GB with every full-size model at its max batch.
    chunk: int = 8
    # The models run in processes of their own and compute at once (the ensemble pipelines
    # the unet of one batch with the decoder of the one before): idle onnxruntime threads
    # sleep rather than spin on cores another model computes on. Measured alike on an AMD
    # EPYC with 2 cores (benchmarks/results/local_server_full_cpu.md), and never worse.
    spin: bool = False
    cpu_lock: str = ""  # none: a lock (one model at a time) was slower there

    def parameters(self) -> dict[str, str]:
        return {"runtime": self.name, "precision": self.precision, "threads": str(self.threads),
                "chunk": str(self.chunk), "spin": "1" if self.spin else "0", "cpu_lock": self.cpu_lock}


def read_config(path: Path) -> mc.ModelConfig:
    return text_format.Parse(Path(path).read_text(), mc.ModelConfig())


def source_configs(source: Path = SOURCE) -> dict[str, mc.ModelConfig]:
    """The configs of model_repository/, by model name."""
    return {p.parent.name: read_config(p) for p in sorted(Path(source).glob("*/config.pbtxt"))}


def local_config(config: mc.ModelConfig, onnx_model: Path, runtime: Runtime) -> mc.ModelConfig:
    local = mc.ModelConfig()
    local.CopyFrom(config)
    local.backend = "python"
    del local.instance_group[:]
    local.instance_group.add(kind=mc.ModelInstanceGroup.KIND_CPU, count=instances(Path(onnx_model)))
    local.ClearField("optimization")  # TensorRT settings mean nothing on a CPU
    del local.model_warmup[:]  # those build TensorRT engines at batch 32: minutes on a CPU
    local.model_warmup.append(warmup(specs.NETWORKS[config.name]))
    if runtime.name != "onnxruntime-cuda" and runtime.chunk and local.HasField("dynamic_batching"):
        small_executions(local.dynamic_batching, runtime.chunk)
    params = {"onnx_model": str(Path(onnx_model).resolve()), **runtime.parameters()}
    for key, value in params.items():
        local.parameters[key].string_value = value
    return local


SMALL_MODEL_BYTES = 300 * 2**20


def instances(onnx_model: Path) -> int:
    """Two instances of a model whose executions are short (its files under SMALL_MODEL_BYTES), one
    of a big one. With priority levels, Triton's dynamic batcher cannot prefetch: a request that
    arrives while the model's only instance runs waits for that instance to be free, and that
    wait can miss its wake-up and sleep out its 500 ms timeout (core's dynamic_batch_scheduler.cc,
    WaitForPayloadSlotAvailable). Measured on the tiny unet, perf_analyzer at concurrency 1: one
    instance p50 5.4 ms, p95 507 ms; two, p95 5.7 ms. A big model's executions take seconds on a
    CPU (the wait is a fraction of one), and a second instance would double its memory."""
    folder = onnx_model.parent
    size = sum(f.stat().st_size for f in folder.iterdir() if f.is_file()) if folder.is_dir() else 0
    return 2 if size < SMALL_MODEL_BYTES else 1


def small_executions(batching: mc.ModelDynamicBatching, items: int) -> None:
    """On a CPU an execution costs its items (no batch is cheaper per item than another) and
    nothing can overtake it once it runs: executions of `items` at most, formed at once from
    the queue in priority order, keep an urgent request's wait to one of them (a GPU runs a
    batch of 32 about as fast as one of 8: there the GPU configs' batching stays)."""
    del batching.preferred_batch_size[:]
    batching.preferred_batch_size.append(items)
    batching.max_queue_delay_microseconds = 0


def warmup(spec: specs.ModelSpec) -> mc.ModelWarmup:
    """One execution at batch 1 before the model reports READY: a runtime's first inference
    allocates, plans and picks kernels (seconds for the full-size models on a CPU), which the
    first user request would otherwise pay."""
    warm = mc.ModelWarmup(name="first_inference_batch_1", batch_size=1)
    for tensor in spec.inputs:
        warm.inputs[tensor.name].data_type = mc.DataType.Value(tensor.triton_dtype)
        warm.inputs[tensor.name].dims.extend(tensor.shape)
        warm.inputs[tensor.name].random_data = True
    return warm


def generate(
    target: Path,
    onnx_repository: Path = SOURCE,
    runtimes: dict[str, Runtime] | None = None,
    source: Path = SOURCE,
) -> list[str]:
    """Write the local repository to `target` (replacing it); return the model names.

    ONNX files are read from `onnx_repository/<name>/1/model.onnx`, where
    `python -m export --repository` wrote them. Each model's parameters also say
    whether its weights are synthetic (random), so that the front end can tell
    its users (`musetalk.synthetic`, read with Triton's model config API).
    """
    runtimes = runtimes or {}
    configs = source_configs(source)
    missing = [
        name for name, c in configs.items()
        if c.platform != "ensemble" and not model_path(onnx_repository, name).is_file()
    ]
    if missing:
        raise FileNotFoundError(
            f"no exported ONNX file for {', '.join(missing)} under {onnx_repository}; "
            f"run: python -m export --repository {onnx_repository} (--weights DIR or --synthetic)"
        )
    shutil.rmtree(target, ignore_errors=True)
    for name, config in configs.items():
        version = Path(target) / name / "1"
        version.mkdir(parents=True)
        if config.platform != "ensemble":
            onnx_model = model_path(onnx_repository, name)
            config = local_config(config, onnx_model, runtimes.get(name, Runtime()))
            synthetic = read_metadata(onnx_model).get(SYNTHETIC_KEY, "unknown")
            config.parameters[SYNTHETIC_KEY].string_value = synthetic
            (version / "model.py").symlink_to(PYTHON_MODEL)
        (Path(target) / name / "config.pbtxt").write_text(text_format.MessageToString(config))
    return list(configs)
