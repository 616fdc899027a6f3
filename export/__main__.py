"""python -m export: build MuseTalk's networks, export them to ONNX, gate each on parity.

    python -m export --weights models                 # real checkpoints (upstream layout)
    python -m export --synthetic                      # random weights, full size: timings only
    python -m export --synthetic --profile tiny --repository /tmp/tiny   # what the tests use
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

from contract import cpu
from contract.layout import model_path
from export import precision
from export.architectures import PROFILES
from export.checkpoints import UNET_FILES, CheckpointError, WeightSource
from export.onnx_configs import CONFIGS
from export.onnx_export import ParityError, export_network
from export.resources import gib

BANNER = """\
################################################################################
#  SYNTHETIC WEIGHTS: random values, not MuseTalk's. Timings are real; the      #
#  faces are noise, not lip sync. Use --weights DIR for the real checkpoints.   #
################################################################################"""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--weights", type=Path, metavar="DIR",
                     help="checkpoint folder in MuseTalk's layout (default: ./models if it exists)")
    src.add_argument("--synthetic", action="store_true",
                     help="random weights of the same architecture (for timing and tests)")
    p.add_argument("--profile", choices=PROFILES, default="full",
                   help="architecture of --synthetic weights; checkpoints carry their own")
    p.add_argument("--version", choices=sorted(UNET_FILES), default="v15",
                   help="MuseTalk UNet version to read from --weights (default v15)")
    p.add_argument("--models", default=",".join(CONFIGS),
                   help=f"comma-separated subset of: {', '.join(CONFIGS)}")
    p.add_argument("--repository", type=Path, default=Path("model_repository"),
                   help="Triton model repository to write <name>/1/model.onnx into")
    p.add_argument("--force", action="store_true", help="re-export even when up to date")
    p.add_argument("--seed", type=int, default=0, help="seed of --synthetic weights")
    args = p.parse_args(argv)
    unknown = set(args.models.split(",")) - set(CONFIGS)
    if unknown:
        p.error(f"unknown model(s) {', '.join(sorted(unknown))}; choose from {', '.join(CONFIGS)}")
    if not args.synthetic and args.weights is None:
        if not Path("models").is_dir():
            p.error("no weights: pass --weights DIR (MuseTalk's models/ layout) or --synthetic")
        args.weights = Path("models")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    source = WeightSource(None if args.synthetic else args.weights, args.profile,
                          args.version, args.seed)
    if source.synthetic:
        print(BANNER, flush=True)
    selected = [CONFIGS[name] for name in CONFIGS if name in args.models.split(",")]
    loaded: dict = {}

    def load(component: str):
        # Keep one weight set in memory at a time; the VAE serves both its halves.
        if component not in loaded:
            loaded.clear()
            loaded[component] = source.load(component)
        return loaded[component]

    for i, config in enumerate(selected, 1):
        tag = f"[{i}/{len(selected)}] {config.name}"
        print(f"{tag}: exporting...", flush=True)
        try:
            result = export_network(config, source, args.repository, args.force, load)
        except (CheckpointError, ParityError) as error:
            print(f"{tag}: FAILED\n{error}", file=sys.stderr)
            return 1
        if result.skipped:
            print(f"{tag}: up to date, skipped ({result.path}; --force redoes it)")
            continue
        print("\n".join(result.parity.lines()))
        print(f"{tag}: done in {result.seconds:.1f} s, peak RSS {gib(result.peak_rss_bytes)}, "
              f"{result.file_bytes / 1e6:.1f} MB -> {result.path}", flush=True)
    loaded.clear()
    gate_reduced_precision(args.repository)
    if source.synthetic:
        print("Exported with SYNTHETIC weights (see banner above).")
    return 0


def gate_reduced_precision(repository: Path) -> None:
    """Measure (once per export) whether the CPU server may run unet + vae_decoder in bf16."""
    if not all(model_path(repository, n).is_file() for n in precision.GATED):
        return
    psnr = precision.recorded_psnr(repository)
    if psnr is None and importlib.util.find_spec("openvino") is None:  # e.g. an export made on a GPU host
        print("[gate] bf16 core: not measured (OpenVINO is not installed): a CPU server runs these files "
              "in fp32", flush=True)
        return
    if psnr is None:
        print("[gate] bf16 core: OpenVINO bf16 unet -> vae_decoder vs onnxruntime fp32...", flush=True)
        psnr = precision.measure_bf16_core(repository)
        precision.record(repository, psnr)
    elif precision.recorded_verdict(repository) is None:  # measured before verdicts were recorded
        precision.record(repository, psnr)
    passed = precision.recorded_verdict(repository) == "pass"
    if passed:
        here = "this one does" if "BF16" in cpu.capabilities() else "this one does not: fp32 here"
        runs = f"bf16 (OpenVINO) on CPUs with native bf16 ({here})"
    else:
        runs = "fp32 (onnxruntime)"
    print(f"[gate] bf16 core face PSNR {psnr:.1f} dB {'passes' if passed else 'FAILS'} the "
          f"{precision.GATE_DB:g} dB gate: the CPU server runs unet and vae_decoder in {runs}")


if __name__ == "__main__":
    sys.exit(main())
