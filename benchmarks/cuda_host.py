"""The GPU measurements on a CUDA host that reaches no package index, in three steps.

    python -m benchmarks.cuda_host wheels          # where PyPI is reachable: build/cuda_wheels/1, 2, ...
    python3 -m benchmarks.cuda_host onnx [OUT]     # on the CUDA host: ONNX vs PyTorch on the GPU
    python3 -m benchmarks.cuda_host triton [OUT]   # then: the local Triton on the GPU, perf_analyzer

The host is expected to bring Python 3.12 with PyTorch for CUDA 13 (and with it NVIDIA's CUDA
and cuDNN wheels, which onnxruntime-gpu loads), onnx, onnxscript, safetensors, tokenizers and
huggingface-hub: a PyTorch CUDA image. `wheels` downloads the rest for Python 3.12 and packs it
in bundles of at most 58 MiB (the 256 MB onnxruntime-gpu wheel in parts), so that each bundle
can travel on its own; the steps on the host put the parts back together and install every
wheel with --no-deps, so nothing the host has is replaced:

- `onnx`: the project's packages for the host's python3 (into /tmp/musetalk-site), the full
  synthetic models exported to model_repository/, then benchmarks.onnx_vs_pytorch on the
  per-frame core at batch 1, 8, 16 and 32, its results written to OUT network by network, with
  this step's log.
- `triton`: the local server's environment (a virtualenv over the host's packages with
  numpy<2, nvidia-pytriton, onnxruntime-gpu and tritonclient 2.51's perf_analyzer), then
  benchmarks.local_server (the core in-process on CUDA beside the ensemble through the local
  Triton on the GPU) and benchmarks.perf_analyzer on the ensemble at concurrency 1, 4 and 16.

Only the standard library is imported here: the steps run before anything is installed.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WHEELS = ROOT / "build" / "cuda_wheels"
RESULTS = ROOT / "benchmarks" / "results"
SITE = Path("/tmp/musetalk-site")  # the project's packages for the host's python3
SERVER_VENV = Path("/tmp/musetalk-triton-venv")  # the local server's environment
BUNDLE_BYTES = 58 * 2**20  # with the working tree (~3 MB), under the 64 MiB a transfer may carry

ONNXRUNTIME = "onnxruntime-gpu==1.31.1"
# What the host lacks for export and the benchmarks (the project's pins); tritonclient's
# gRPC client is what the launchers and benchmarks talk to the local server with.
FOR_THE_PROJECT = [ONNXRUNTIME, "diffusers==0.42.1", "transformers==5.23.0", "importlib-metadata==10.2.0",
                   "tritonclient==2.73.0", "python-rapidjson==1.25", "tqdm==4.70.1"]
# The local server's environment (triton_local/requirements.txt, but OpenVINO: it runs on the GPU).
FOR_THE_SERVER = [ONNXRUNTIME, "nvidia-pytriton==0.7.0", "numpy==1.26.4", "tritonclient==2.51.0"]
PLATFORMS = ["manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux_2_27_x86_64", "manylinux_2_28_x86_64",
             "manylinux_2_31_x86_64", "manylinux_2_34_x86_64", "manylinux_2_35_x86_64", "manylinux1_x86_64", "any"]


def wheels(python: str = sys.executable) -> None:
    """Download every wheel for Python 3.12 on x86-64 Linux and pack them into bundles."""
    shutil.rmtree(WHEELS, ignore_errors=True)
    downloads = WHEELS / "downloads"
    for requirement in dict.fromkeys(FOR_THE_PROJECT + FOR_THE_SERVER):
        command = [python, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                   "--python-version", "3.12", "--implementation", "cp",
                   *(f"--platform={p}" for p in PLATFORMS), "--dest", str(downloads), requirement]
        print("$", " ".join(command[3:]), flush=True)
        subprocess.run(command, check=True)
    # The onnx step's wheels in the first bundles, the server's after them: the first step can
    # start before the rest has travelled.
    bundles: list[list[tuple[str, bytes]]] = []
    server_only = [r for r in FOR_THE_SERVER if r not in FOR_THE_PROJECT]
    for group in (FOR_THE_PROJECT, server_only):
        pieces = []  # (name, bytes): whole wheels, and the big ones cut into parts
        for wheel in sorted(wheel_files(downloads, group), key=lambda w: -Path(w).stat().st_size):
            data = Path(wheel).read_bytes()
            pieces += [(Path(wheel).name if len(data) <= BUNDLE_BYTES else f"{Path(wheel).name}.part{i:02d}",
                        data[start:start + BUNDLE_BYTES])
                       for i, start in enumerate(range(0, len(data), BUNDLE_BYTES))]
        first = len(bundles)
        for piece in pieces:  # first fit, biggest first, among this group's bundles
            fits = next((b for b in bundles[first:] if sum(len(d) for _, d in b) + len(piece[1]) <= BUNDLE_BYTES),
                        None)
            if fits is None:
                bundles.append(fits := [])
            fits.append(piece)
    for number, bundle in enumerate(bundles, 1):
        folder = WHEELS / str(number)
        folder.mkdir(parents=True)
        for name, data in bundle:
            (folder / name).write_bytes(data)
        print(f"{folder.relative_to(ROOT)}: {sum(len(d) for _, d in bundle) / 2**20:.0f} MiB: "
              f"{', '.join(name for name, _ in bundle)}")
    shutil.rmtree(downloads)


def assembled() -> Path:
    """The wheels of every bundle present, the parts put back together, in one folder."""
    out = Path("/tmp/musetalk-wheels")
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    parts: dict[str, list[Path]] = {}
    for path in sorted(WHEELS.glob("*/*.whl*")):
        if path.suffix == ".whl":
            shutil.copy(path, out / path.name)
        else:
            parts.setdefault(path.name.rsplit(".part", 1)[0], []).append(path)
    for name, pieces in parts.items():
        with (out / name).open("wb") as whole:
            for piece in sorted(pieces, key=lambda p: p.name):
                whole.write(piece.read_bytes())
    return out


def wheel_files(folder: Path, requirements: list[str]) -> list[str]:
    """The files in `folder` of these pinned requirements."""
    files = []
    for requirement in requirements:
        name, version = requirement.split("==")
        stem = f"{name.replace('-', '_').lower()}-{version}-"
        found = [p for p in folder.glob("*.whl") if p.name.lower().startswith(stem)]
        if not found:
            raise SystemExit(f"no wheel of {requirement} in {folder}: were all of {WHEELS}/*/ carried here?")
        files.append(str(found[0]))
    return files


def install(requirements: list[str], target: Path | None = None, environment: Path | None = None) -> None:
    """The host's pip installs the wheels into folder `target`, or into the virtualenv `environment`
    (its bin/ then gets the wheels' programs: perf_analyzer)."""
    folder = assembled()
    into = ["--target", str(target)] if target else []
    command = [sys.executable, "-m", "pip", *(["--python", str(environment / "bin" / "python")] if environment
                                                else []),
               "install", "--quiet", "--no-index", "--no-deps", "--no-compile", "--upgrade", *into,
               *wheel_files(folder, requirements)]
    subprocess.run(command, check=True)


def step(command: list[str], log, env: dict[str, str]) -> None:
    """Run one command, its output both shown and logged; a failure stops the step."""
    print("$", " ".join(command), flush=True)
    log.write(f"$ {' '.join(command)}\n")
    log.flush()
    started = time.perf_counter()
    with subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True) as process:
        for line in process.stdout:  # as it comes: a step cut short keeps what it printed
            sys.stdout.write(line)
            log.write(line)
            log.flush()
    log.write(f"# exit {process.returncode} after {time.perf_counter() - started:.0f} s\n")
    log.flush()
    if process.returncode:
        raise SystemExit(f"{command[2] if len(command) > 2 else command[0]} failed ({process.returncode})")


def server_environment() -> None:
    """A virtualenv whose own packages (numpy<2 for the python backend's stub) come first and the
    host's (NVIDIA's CUDA wheels among them) after: the host's python3 may itself be a
    virtualenv, whose packages --system-site-packages would not see."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(SERVER_VENV)], check=True)
    import site

    own = next(SERVER_VENV.glob("lib/python3*/site-packages"))
    (own / "host_packages.pth").write_text("\n".join(site.getsitepackages()) + "\n")


def project_env() -> dict[str, str]:
    """The host's python3 with the project's packages first; NVIDIA's CUDA libraries (PyTorch's
    wheels) on the loader's path, where onnxruntime-gpu, installed elsewhere, looks last."""
    import site

    nvidia = sorted({str(lib) for packages in site.getsitepackages() for lib in Path(packages).glob("nvidia/**/lib")})
    libraries = os.pathsep.join([*nvidia, *filter(None, [os.environ.get("LD_LIBRARY_PATH")])])
    return dict(os.environ, PYTHONPATH=str(SITE), PYTHONUNBUFFERED="1", LD_LIBRARY_PATH=libraries)


def onnx_step(out: Path) -> None:
    install(FOR_THE_PROJECT, target=SITE)
    env = project_env()
    with (out / "onnx_step.log").open("w") as log:
        step([sys.executable, "-c", _VERSIONS], log, env)
        step([sys.executable, "-m", "export", "--synthetic", "--profile", "full"], log, env)
        # The per-frame core first: the encoders run once per 30 s of speech or per avatar frame.
        step([sys.executable, "-m", "benchmarks.onnx_vs_pytorch", "--repeats", "5",
              "--networks", "positional_encoding,unet,vae_decoder", "--results", str(out)], log, env)


def triton_step(out: Path) -> None:
    if not (SITE / "onnxruntime").is_dir():
        raise SystemExit("run the onnx step first (it installs the project's packages and exports the models)")
    if not (SERVER_VENV / "bin" / "python").exists():
        server_environment()
    install(FOR_THE_SERVER, environment=SERVER_VENV)
    env = dict(project_env(), MUSETALK_TRITON_VENV=str(SERVER_VENV), MUSETALK_LOCAL_DEVICE="cuda")
    with (out / "triton_step.log").open("w") as log:
        step([sys.executable, "-m", "benchmarks.local_server", "--batch", "16", "--requests", "32",
              "--concurrency", "4", "--repeats", "10", "--label", "full_cuda"], log, env)
        step([sys.executable, "-m", "benchmarks.perf_analyzer", "--local", "--models", "musetalk",
              "--protocols", "grpc", "--concurrency", "1,4,16", "--measurement-ms", "3000",
              "--label", "full_cuda"], log, env)
    for result in [*RESULTS.glob("local_server_full_cuda.*"), *RESULTS.glob("perf_analyzer_full_cuda.*")]:
        shutil.copy(result, out / result.name)


# What the results are measured with, printed first into the log.
_VERSIONS = """
import subprocess, torch, onnxruntime
print(subprocess.run(["nvidia-smi"], capture_output=True, text=True).stdout)
print("torch", torch.__version__, "CUDA", torch.version.cuda, "cuDNN", torch.backends.cudnn.version(),
      "GPU", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
onnxruntime.preload_dlls()
print("onnxruntime", onnxruntime.__version__, onnxruntime.get_available_providers())
"""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.cuda_host", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("step", choices=["wheels", "onnx", "triton"])
    p.add_argument("out", nargs="?", type=Path, default=Path(os.environ.get("OUT", RESULTS)),
                   help="where the results and logs are copied (default: $OUT, else benchmarks/results)")
    args = p.parse_args(argv)
    if args.step == "wheels":
        wheels()
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    {"onnx": onnx_step, "triton": triton_step}[args.step](args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
