"""How much faster is ONNX? PyTorch eager vs onnxruntime / OpenVINO on the same weights.

    python -m benchmarks.onnx_vs_pytorch            # full size; batches 1,8,16,32 on CUDA, 1,4,16 on a CPU
    python -m benchmarks.onnx_vs_pytorch --profile tiny --batches 1,4 --repeats 2

Every network of the repository's exported ONNX files is timed against the
PyTorch module it was exported from (the same weights: the ONNX files' export
key must match), in one process, interleaved: each repetition runs every
backend once, in rotating order, so machine noise hits all of them. The core
is what every video frame costs: positional_encoding + unet + vae_decoder.
Errors are measured against PyTorch fp32: relative L2 for float outputs, PSNR
of the uint8 face (against PyTorch fp32's face) for the decoder.

On a CUDA machine (benchmarks/backends.py says how each runs; tensors stay on the GPU):
PyTorch fp32, TF32, bf16/fp16 autocast, fp16, fp16 with the export's sub-pixel rewrite,
and that as a CUDA graph; onnxruntime's CUDA provider on the shipped fp32 files (TF32 off
and on, and as a CUDA graph) and on fp16 copies of them (export.fp16: all fp16, or the
normalisations kept in fp32; each also as a CUDA graph); TensorRT fp16 where onnxruntime
has it. On a CPU: PyTorch fp32 and bf16 autocast, onnxruntime's CPU provider and OpenVINO
in fp32 and bf16.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from benchmarks.backends import Backend, OnnxruntimeOnDevice, on_host, pytorch
from benchmarks.provenance import invocation, machine, publish
from contract.layout import model_path
from contract.runners import Runner, open_runner
from export.checkpoints import WeightSource
from export.fp16 import NORMALISATIONS, to_fp16
from export.onnx_configs import CONFIGS
from export.onnx_export import export_key, recorded_key
from export.precision import face_psnr

RESULTS = Path(__file__).resolve().parent / "results"
BUILD = Path(__file__).resolve().parent.parent / "build"
CORE = ("positional_encoding", "unet", "vae_decoder")
# The fp16 copies of the ONNX files measured on CUDA (export.fp16): every operator in fp16, or
# the normalisations kept in fp32.
FP16_KEPT = {"fp16": (), "fp16-norms32": NORMALISATIONS}
FP16_VARIANTS = tuple(FP16_KEPT)


def positional(run: Runner, names: list[str]) -> Callable:
    """A runner of contract.runners called with inputs in order, answering outputs in order."""
    return lambda inputs: list(run(dict(zip(names, inputs))).values())


def backends_for(config, module, onnx_file: Callable[[str], Path], cuda: bool,
                 fp16: tuple[str, ...] = FP16_VARIANTS) -> list[Backend]:
    """The backends compared on this machine; PyTorch strict fp32 first, the reference.

    `onnx_file(variant)` answers the checked ONNX file ("fp32": the shipped one; an fp16
    variant: its copy, made on first use), asked only when an ONNX backend runs.
    """
    names = config.input_names
    if not cuda:
        path = onnx_file("fp32")
        return [
            pytorch("pytorch-fp32", module),
            pytorch("pytorch-bf16", module, autocast=torch.bfloat16),
            on_host("onnxruntime-fp32", positional(open_runner(path), names)),
            on_host("openvino-fp32", positional(open_runner(path, "openvino", "f32"), names)),
            on_host("openvino-bf16", positional(open_runner(path, "openvino", "bf16"), names)),
        ]
    backends = [
        pytorch("pytorch-fp32", module, "cuda"),
        pytorch("pytorch-tf32", module, "cuda", tf32=True),
        pytorch("pytorch-bf16-autocast", module, "cuda", autocast=torch.bfloat16),
        pytorch("pytorch-fp16-autocast", module, "cuda", autocast=torch.float16),
        pytorch("pytorch-fp16", module, "cuda", half=True),
    ]
    if config.rewrites:  # what the exported graph computes, in fp16
        backends.append(pytorch("pytorch-fp16-subpixel", module, "cuda", half=True, rewrites=config.rewrites))
    # The nearest PyTorch gets to a built engine: the exported maths in fp16, no launch cost.
    backends.append(pytorch("pytorch-fp16-graph", module, "cuda", half=True, rewrites=config.rewrites,
                            graph=True))
    providers = _onnxruntime_providers()
    ways = []  # (file variant, session options, [(backend name, as a CUDA graph)])
    if "CUDAExecutionProvider" in providers:
        ways += [("fp32", {"tf32": False}, [("onnxruntime-cuda-fp32", False), ("onnxruntime-cuda-fp32-graph", True)]),
                 ("fp32", {"tf32": True}, [("onnxruntime-cuda-tf32", False)])]
        ways += [(variant, {}, [(f"onnxruntime-cuda-{variant}", False), (f"onnxruntime-cuda-{variant}-graph", True)])
                 for variant in fp16]
    if "TensorrtExecutionProvider" in providers:
        trt = {"trt_fp16_enable": True, "trt_engine_cache_enable": True,
               "trt_engine_cache_path": str(BUILD / "trt_cache")}
        ways.append(("fp32", {"tensorrt": trt}, [("onnxruntime-tensorrt-fp16", False)]))
    for variant, options, named in ways:
        try:
            session = OnnxruntimeOnDevice(onnx_file(variant), **options)
        except Exception as failure:  # noqa: BLE001 - a provider that cannot run here leaves the others
            print(f"  {config.name}: {', '.join(n for n, _ in named)} cannot run: {str(failure).splitlines()[0]}",
                  flush=True)
            continue
        backends += [session.backend(name, graph=graph) for name, graph in named]
    return backends


def _load_cuda_libraries() -> None:
    """onnxruntime-gpu finds cuDNN and cuBLAS in the NVIDIA wheels PyTorch brings, once loaded."""
    try:
        import onnxruntime
    except ImportError:
        return
    if hasattr(onnxruntime, "preload_dlls"):
        onnxruntime.preload_dlls()


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
            cuda: bool, fp16: tuple[str, ...] = FP16_VARIANTS) -> list[dict]:
    config = CONFIGS[name]

    def onnx_file(variant: str) -> Path:
        path = model_path(repository, name)
        if recorded_key(path) != export_key(config, source):
            raise SystemExit(f"{path} was not exported from these weights: run "
                             f"`python -m export ...` with the same --weights/--synthetic/--profile first")
        if variant == "fp32":
            return path
        print(f"  {name}: making its {variant} copy...", flush=True)
        return to_fp16(path, model_path(BUILD / variant / repository.resolve().name, name), FP16_KEPT[variant])

    module = config.build(source.load(config.component) if config.component else None).eval()
    backends = backends_for(config, module, onnx_file, cuda, fp16)
    rows = []
    for batch in batches:
        inputs = [t.numpy() for t in config.sample(batch, torch.Generator().manual_seed(batch))]
        bound, outputs = {}, {}  # bound once per batch; the first call warms up and gives the outputs compared
        for b in list(backends):
            try:
                bound[b.name] = b.bind(inputs)
                bound[b.name]()
                outputs[b.name] = bound[b.name].outputs()[0]
            except Exception as failure:  # noqa: BLE001 - e.g. pure fp16 of a network that casts its uint8 input
                reason = (str(failure) or type(failure).__name__).splitlines()[0]
                print(f"  {name:20s} batch {batch:3d} {b.name:30s} cannot run: {reason}", flush=True)
                backends.remove(b)
                bound.pop(b.name, None)
        reference = outputs[backends[0].name]
        times = {b.name: [] for b in backends}
        for r in range(repeats):
            for b in backends[r % len(backends):] + backends[: r % len(backends)]:
                started = time.perf_counter()
                bound[b.name]()
                times[b.name].append(time.perf_counter() - started)
        del bound  # device buffers go before the next batch's
        base = statistics.median(times[backends[0].name])
        for b in backends:
            ms = statistics.median(times[b.name]) * 1000
            rows.append({"network": name, "backend": b.name, "batch": batch,
                         "ms_per_call": round(ms, 3), "ms_per_frame": round(ms / batch, 3),
                         "speedup": round(base * 1000 / ms, 2),
                         **error(reference, outputs[b.name])})
            print(f"  {name:20s} batch {batch:3d} {b.name:30s} {ms / batch:9.3f} ms/frame "
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


def write(rows: list[dict], core: list[dict], args, command_line: str, cuda: bool) -> Path:
    stem = args.results / f"onnx_vs_pytorch_{args.profile}_{'cuda' if cuda else 'cpu'}"
    versions = _versions(cuda)
    header = [f"# ONNX vs PyTorch ({args.profile} profile, {'CUDA' if cuda else 'CPU'})", "",
              f"- produced by: `{command_line}`", f"- machine: {machine()}; {torch.get_num_threads()} torch threads",
              f"- versions: {', '.join(f'{k} {v}' for k, v in versions.items())}",
              "- weights: " + ("synthetic (random values: real timings, no lip sync)" if args.synthetic
                               else "checkpoints"),
              f"- median of {args.repeats} interleaved runs after a warm-up; date {time.strftime('%Y-%m-%d')}",
              *(["- inputs and outputs stay on the GPU: a call's time is the network's alone (I/O binding for "
                 "onnxruntime), as in a server that keeps tensors on the device; TensorRT rows copy them"]
                if cuda else []),
              *([f"- fp16 ONNX rows: the shipped files converted by export.fp16 ({', '.join(FP16_VARIANTS)}: "
                 "every operator in fp16 / normalisations kept in fp32), inputs and outputs as shipped"]
                if cuda else []),
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
    return publish(stem.with_suffix(".md"), lines, {"rows": rows, "core": core})


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
    p.add_argument("--batches", default=None, help="default: 1,8,16,32 on CUDA, 1,4,16 on a CPU")
    p.add_argument("--encoder-batches", default="1,4",
                   help="batches for audio_encoder and vae_encoder (not per-frame networks)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--results", type=Path, default=RESULTS, help="where the tables are written (after each network)")
    p.add_argument("--fp16", default=",".join(FP16_VARIANTS),
                   help=f"fp16 ONNX copies measured on CUDA: any of {', '.join(FP16_VARIANTS)} (empty: none)")
    args = p.parse_args(argv)
    if args.weights:
        args.synthetic = False
    command_line = invocation("benchmarks.onnx_vs_pytorch", argv)
    cuda = torch.cuda.is_available()
    args.batches = args.batches or ("1,8,16,32" if cuda else "1,4,16")
    fp16 = tuple(v for v in args.fp16.split(",") if v)
    if unknown := set(fp16) - set(FP16_VARIANTS):
        p.error(f"--fp16: unknown {', '.join(sorted(unknown))}; use {', '.join(FP16_VARIANTS)}")
    if cuda:
        _load_cuda_libraries()
    # cuDNN picks its fastest kernels during the warm-up, as TensorRT does at build.
    torch.backends.cudnn.benchmark = cuda
    source = WeightSource(args.weights, args.profile)
    rows = []
    for name in args.networks.split(","):
        batches = args.batches if name in CORE else args.encoder_batches
        print(f"{name}:", flush=True)
        rows += measure(name, source, args.repository, [int(b) for b in batches.split(",")],
                        args.repeats, cuda, fp16)
        write(rows, core_rows(rows), args, command_line, cuda)  # a run cut short keeps what it measured
    core = core_rows(rows)
    print("\ncore (positional_encoding + unet + vae_decoder), per frame:")
    for r in core:
        print(f"  batch {r['batch']:3d} {r['backend']:26s} {r['ms_per_frame']:9.3f} ms  x{r['speedup']:.2f}  "
              f"face PSNR {r['face_psnr_db']} dB")
    print(f"results: {write(rows, core, args, command_line, cuda)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
