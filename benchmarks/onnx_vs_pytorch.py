"""How much faster is ONNX? PyTorch eager vs onnxruntime / OpenVINO on the same weights.

    python -m benchmarks.onnx_vs_pytorch                     # full size, batches 1, 4, 16
    python -m benchmarks.onnx_vs_pytorch --profile tiny --batches 1,4 --repeats 2

Every network of the repository's exported ONNX files is timed against the
PyTorch module it was exported from (the same weights: the ONNX files' export
key must match), in one process, interleaved: each repetition runs every
backend once, in rotating order, so machine noise hits all of them. The core
is what every video frame costs: positional_encoding + unet + vae_decoder.
Errors are measured against PyTorch fp32: relative L2 for float outputs, PSNR
of the uint8 face (against PyTorch fp32's face) for the decoder.

On a CUDA machine the backends are PyTorch fp32 and fp16, and onnxruntime's
CUDA and TensorRT (fp16) providers; on a CPU, PyTorch fp32 and bf16 autocast,
onnxruntime's CPU provider and OpenVINO in fp32 and bf16.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from benchmarks.provenance import invocation, machine
from contract.layout import model_path
from contract.runners import Runner, onnxruntime_runner, open_runner
from export.checkpoints import WeightSource
from export.onnx_configs import CONFIGS
from export.onnx_export import export_key, recorded_key
from export.precision import face_psnr

RESULTS = Path(__file__).resolve().parent / "results"
CORE = ("positional_encoding", "unet", "vae_decoder")


@dataclass
class Backend:
    name: str
    run: Callable[[list[np.ndarray]], list[np.ndarray]]


def pytorch(module, device: str = "cpu", *, half: bool = False, autocast: torch.dtype | None = None,
            tf32: bool = False, rewrites: tuple = (), graph: bool = False) -> Callable:
    """PyTorch eager: strict fp32 by default; or TF32 tensor cores, autocast to a dtype
    (norms stay fp32), the whole module in fp16, the export's exact rewrites, and
    replay as a CUDA graph (no per-kernel launch cost, as in a built engine)."""
    if half or rewrites:  # a copy: the fp32 backends keep the original
        module = copy.deepcopy(module)
    applied = ExitStack()
    for rewrite in rewrites:
        applied.enter_context(rewrite(module))
    module = (module.half() if half else module).to(device)
    forward = _graphed(module) if graph else module

    def run(inputs):
        tensors = [torch.from_numpy(x).to(device) for x in inputs]
        if half:
            tensors = [t.half() if t.is_floating_point() else t for t in tensors]
        with torch.no_grad(), _tf32(tf32), torch.autocast(device, dtype=autocast or torch.bfloat16,
                                                          enabled=autocast is not None):
            out = forward(*tensors)
        if device == "cuda":
            torch.cuda.synchronize()
        out = out if isinstance(out, tuple) else (out,)
        return [o.float().cpu().numpy() if o.is_floating_point() else o.cpu().numpy() for o in out]

    # The rewrites undo themselves when their context closes, which garbage
    # collection of the stack would do: the runner holds it open.
    run.rewrites = applied
    return run


def _graphed(module) -> Callable:
    """`module` captured as one CUDA graph per input shape, replayed on static tensors."""
    graphs = {}

    def forward(*tensors):
        shapes = tuple(t.shape for t in tensors)
        if shapes not in graphs:
            static = [t.clone() for t in tensors]
            side = torch.cuda.Stream()  # warm-up off the default stream, as capture requires
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(3):
                    module(*static)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = module(*static)
            graphs[shapes] = graph, static, out
        graph, static, out = graphs[shapes]
        for target, value in zip(static, tensors):
            target.copy_(value)
        graph.replay()
        return out.clone()

    return forward


@contextmanager
def _tf32(enabled: bool):
    """TF32 for matmuls and convolutions on or off (PyTorch's default has convolutions on)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def positional(run: Runner, names: list[str]) -> Callable:
    """A runner of contract.runners called with inputs in order, answering outputs in order."""
    return lambda inputs: list(run(dict(zip(names, inputs))).values())


def backends_for(config, module, onnx_file: Callable[[], Path], cuda: bool) -> list[Backend]:
    """The backends compared on this machine; PyTorch strict fp32 first, the reference.

    `onnx_file()` answers the checked ONNX file, asked only when an ONNX backend runs.
    """
    names = config.input_names
    if not cuda:
        path = onnx_file()
        return [
            Backend("pytorch-fp32", pytorch(module)),
            Backend("pytorch-bf16", pytorch(module, autocast=torch.bfloat16)),
            Backend("onnxruntime-fp32", positional(open_runner(path), names)),
            Backend("openvino-fp32", positional(open_runner(path, "openvino", "f32"), names)),
            Backend("openvino-bf16", positional(open_runner(path, "openvino", "bf16"), names)),
        ]
    backends = [
        Backend("pytorch-fp32", pytorch(module, "cuda")),
        Backend("pytorch-tf32", pytorch(module, "cuda", tf32=True)),
        Backend("pytorch-bf16-autocast", pytorch(module, "cuda", autocast=torch.bfloat16)),
        Backend("pytorch-fp16-autocast", pytorch(module, "cuda", autocast=torch.float16)),
        Backend("pytorch-fp16", pytorch(module, "cuda", half=True)),
    ]
    if config.rewrites:  # what the exported graph computes, in fp16
        backends.append(Backend("pytorch-fp16-subpixel",
                                pytorch(module, "cuda", half=True, rewrites=config.rewrites)))
    # The nearest PyTorch gets to a built engine: the exported maths in fp16, no launch cost.
    backends.append(Backend("pytorch-fp16-graph",
                            pytorch(module, "cuda", half=True, rewrites=config.rewrites, graph=True)))
    providers = _onnxruntime_providers()
    if "CUDAExecutionProvider" in providers:
        backends.append(Backend("onnxruntime-cuda-fp32", positional(
            onnxruntime_runner(onnx_file(), providers=["CUDAExecutionProvider"]), names)))
    if "TensorrtExecutionProvider" in providers:
        trt = ("TensorrtExecutionProvider", {"trt_fp16_enable": True, "trt_engine_cache_enable": True,
                                             "trt_engine_cache_path": str(RESULTS.parent / ".trt_cache")})
        backends.append(Backend("onnxruntime-tensorrt-fp16", positional(
            onnxruntime_runner(onnx_file(), providers=[trt, "CUDAExecutionProvider"]), names)))
    return backends


def _onnxruntime_providers() -> list[str]:
    try:
        import onnxruntime
    except ImportError:
        return []
    return onnxruntime.get_available_providers()


def error(reference: np.ndarray, value: np.ndarray) -> dict:
    if value is reference:
        return {"reference": True}
    if reference.dtype == np.uint8:
        return {"face_psnr_db": round(face_psnr(reference, value), 1)}
    rel = np.linalg.norm(value.astype(np.float64) - reference) / max(np.linalg.norm(reference), 1e-30)
    return {"rel_l2": float(f"{rel:.2e}")}


def measure(name: str, source: WeightSource, repository: Path, batches: list[int], repeats: int,
            cuda: bool) -> list[dict]:
    config = CONFIGS[name]

    def onnx_file() -> Path:
        path = model_path(repository, name)
        if recorded_key(path) != export_key(config, source):
            raise SystemExit(f"{path} was not exported from these weights: run "
                             f"`python -m export ...` with the same --weights/--synthetic/--profile first")
        return path

    module = config.build(source.load(config.component) if config.component else None).eval()
    backends = backends_for(config, module, onnx_file, cuda)
    rows = []
    for batch in batches:
        inputs = [t.numpy() for t in config.sample(batch, torch.Generator().manual_seed(batch))]
        outputs = {}  # the warm-up, and the outputs compared
        for b in list(backends):
            try:
                outputs[b.name] = b.run(inputs)[0]
            except RuntimeError as failure:  # e.g. pure fp16 of a network that casts its uint8 input to fp32
                reason = (str(failure) or type(failure).__name__).splitlines()[0]
                print(f"  {name:20s} batch {batch:3d} {b.name:26s} cannot run: {reason}", flush=True)
                backends.remove(b)
        reference = outputs[backends[0].name]
        times = {b.name: [] for b in backends}
        for r in range(repeats):
            for b in backends[r % len(backends):] + backends[: r % len(backends)]:
                started = time.perf_counter()
                b.run(inputs)
                times[b.name].append(time.perf_counter() - started)
        base = statistics.median(times[backends[0].name])
        for b in backends:
            ms = statistics.median(times[b.name]) * 1000
            rows.append({"network": name, "backend": b.name, "batch": batch,
                         "ms_per_call": round(ms, 3), "ms_per_frame": round(ms / batch, 3),
                         "speedup": round(base * 1000 / ms, 2),
                         **error(reference, outputs[b.name])})
            print(f"  {name:20s} batch {batch:3d} {b.name:26s} {ms / batch:9.3f} ms/frame "
                  f"x{rows[-1]['speedup']:5.2f}  {json.dumps(error(reference, outputs[b.name]))}",
                  flush=True)
    return rows


def core_rows(rows: list[dict]) -> list[dict]:
    """Per-frame cost of positional_encoding + unet + vae_decoder, per backend and batch."""
    out = []
    keys = sorted({(r["backend"], r["batch"]) for r in rows if r["network"] in CORE})
    for backend, batch in keys:
        parts = [r for r in rows if r["network"] in CORE and r["backend"] == backend and r["batch"] == batch]
        if len(parts) == len(CORE):
            face = next(r for r in parts if r["network"] == "vae_decoder")
            out.append({"network": "core", "backend": backend, "batch": batch,
                        "ms_per_frame": round(sum(r["ms_per_frame"] for r in parts), 3),
                        "face_psnr_db": face.get("face_psnr_db", "reference")})
    reference = rows[0]["backend"]  # the first backend measured: PyTorch fp32
    for row in out:
        base = next(r for r in out if r["batch"] == row["batch"] and r["backend"] == reference)
        row["speedup"] = round(base["ms_per_frame"] / row["ms_per_frame"], 2)
    return sorted(out, key=lambda r: (r["batch"], -r["ms_per_frame"]))


def machine_used(cuda: bool) -> str:
    if cuda:
        return f"{torch.cuda.get_device_name(0)}; host {machine()}"
    return f"{machine()}, {torch.get_num_threads()} torch threads"


def write(rows: list[dict], core: list[dict], args, command_line: str, cuda: bool) -> Path:
    RESULTS.mkdir(exist_ok=True)
    stem = RESULTS / f"onnx_vs_pytorch_{args.profile}_{'cuda' if cuda else 'cpu'}"
    versions = _versions(cuda)
    header = [f"# ONNX vs PyTorch ({args.profile} profile, {'CUDA' if cuda else 'CPU'})", "",
              f"- produced by: `{command_line}`", f"- machine: {machine_used(cuda)}",
              f"- versions: {', '.join(f'{k} {v}' for k, v in versions.items())}",
              "- weights: " + ("synthetic (random values: real timings, no lip sync)" if args.synthetic
                               else "checkpoints"),
              f"- median of {args.repeats} interleaved runs after a warm-up; date {time.strftime('%Y-%m-%d')}",
              *(["- a call's time includes moving its inputs to the GPU and its outputs back"] if cuda else []),
              "",
              "## The per-frame core (positional_encoding + unet + vae_decoder)", "",
              "| batch | backend | ms per frame | speed-up vs PyTorch fp32 | face PSNR vs PyTorch fp32 |",
              "|---|---|---|---|---|"]
    lines = header + [f"| {r['batch']} | {r['backend']} | {_ms(r['ms_per_frame'])} | {r['speedup']:.2f}x | "
                      f"{_psnr(r.get('face_psnr_db', 'reference'))} |" for r in core]
    lines += ["", "## Each network", "",
              "| network | batch | backend | ms per call | ms per frame | speed-up | error vs PyTorch fp32 |",
              "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['network']} | {r['batch']} | {r['backend']} | {_ms(r['ms_per_call'])} | "
              f"{_ms(r['ms_per_frame'])} | {r['speedup']:.2f}x | "
              f"{_error_text(r)} |" for r in rows]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    stem.with_suffix(".json").write_text(json.dumps({"rows": rows, "core": core}, indent=2))
    return stem.with_suffix(".md")


def _versions(cuda: bool) -> dict[str, str]:
    found = {}
    for name in ("torch", "onnxruntime", "openvino"):
        try:
            found[name] = __import__(name).__version__
        except ImportError:
            found[name] = "absent"
    if cuda:
        found["CUDA"] = torch.version.cuda
        found["cuDNN"] = str(torch.backends.cudnn.version())
        found["onnxruntime providers"] = "/".join(_onnxruntime_providers()) or "none"
    return found


def _ms(value: float) -> str:
    """Three significant figures: GPU calls take fractions of a millisecond, CPU ones seconds."""
    return f"{value:.0f}" if value >= 100 else f"{value:.3g}"


def _psnr(value) -> str:
    return "reference" if value == "reference" else f"{value} dB"


def _error_text(row: dict) -> str:
    if row.get("reference"):
        return "reference"
    return f"face PSNR {row['face_psnr_db']} dB" if "face_psnr_db" in row else f"rel-L2 {row['rel_l2']}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.onnx_vs_pytorch", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--weights", type=Path, help="checkpoints the ONNX files were exported from")
    src.add_argument("--synthetic", action="store_true", default=True)
    p.add_argument("--profile", choices=["full", "tiny"], default="full")
    p.add_argument("--repository", type=Path, default=Path("model_repository"))
    p.add_argument("--networks", default=",".join(CONFIGS))
    p.add_argument("--batches", default="1,4,16")
    p.add_argument("--encoder-batches", default="1,4",
                   help="batches for audio_encoder and vae_encoder (not per-frame networks)")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    if args.weights:
        args.synthetic = False
    command_line = invocation("benchmarks.onnx_vs_pytorch", argv)
    cuda = torch.cuda.is_available()
    # cuDNN picks its fastest kernels during the warm-up, as TensorRT does at build.
    torch.backends.cudnn.benchmark = cuda
    source = WeightSource(args.weights, args.profile)
    rows = []
    for name in args.networks.split(","):
        batches = args.batches if name in CORE else args.encoder_batches
        print(f"{name}:", flush=True)
        rows += measure(name, source, args.repository, [int(b) for b in batches.split(",")],
                        args.repeats, cuda)
    core = core_rows(rows)
    print("\ncore (positional_encoding + unet + vae_decoder), per frame:")
    for r in core:
        print(f"  batch {r['batch']:3d} {r['backend']:26s} {r['ms_per_frame']:9.3f} ms  x{r['speedup']:.2f}  "
              f"face PSNR {r['face_psnr_db']} dB")
    print(f"results: {write(rows, core, args, command_line, cuda)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
