"""perf_analyzer against a Triton server: the ensemble and each model, gRPC and HTTP, a concurrency sweep.

    python -m benchmarks.perf_analyzer --url localhost:8001           # a running server (e.g. the GPU container)
    python -m benchmarks.perf_analyzer --local --onnx-repository model_repository   # starts the local server

perf_analyzer is the binary shipped in the tritonclient 2.51.0 wheel of the
server environment (.venv-triton); it needs libb64.so.0d and libcudart.so.12,
taken from the nvidia-pytriton wheel's bundled libraries. Each run's exact
command line is printed and stored with its results.
"""
from __future__ import annotations

import argparse
import csv
import io
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.provenance import invocation, machine, publish
from contract import specs
from triton_local.server import BUILD, ServerEnvironment, http_url_beside, relink

RESULTS = Path(__file__).resolve().parent / "results"
NEEDED_LIBS = {"libb64.so.0d": "libb64-", "libcudart.so.12": "libcudart-"}


def perf_analyzer_binary(environment: ServerEnvironment | None = None) -> Path:
    env = environment or ServerEnvironment()
    binary = env.venv / "bin" / "perf_analyzer"
    if not binary.exists():
        raise FileNotFoundError(f"{binary} is missing: run `make triton-env` (tritonclient==2.51.0)")
    return binary


def library_dir(environment: ServerEnvironment | None = None) -> Path:
    """A folder of the library names perf_analyzer asks for, linked to the pytriton wheel's copies."""
    env = environment or ServerEnvironment()
    bundled = Path(env.facts["pytriton"]).parent / "nvidia_pytriton.libs"
    folder = BUILD / "perf_analyzer_libs"
    folder.mkdir(parents=True, exist_ok=True)
    for name, prefix in NEEDED_LIBS.items():
        relink(folder / name, next(bundled.glob(f"{prefix}*")))
    return folder


def perf_analyzer_command(model: str, url: str, protocol: str = "grpc", concurrency: str = "1:4:3",
                          batch_size: int = 1, measurement_ms: int = 5000,
                          request_count: int | None = None, csv_file: Path | None = None,
                          stability: int = 20) -> list[str]:
    # A 2-core machine running the server and perf_analyzer is noisy: windows
    # within 20% of each other count as stable (perf_analyzer's default is 10%).
    command = [
        str(perf_analyzer_binary()), "-m", model, "-u", url, "-i", protocol,
        "-b", str(batch_size), f"--concurrency-range={concurrency}", "--percentile=95",
        f"--stability-percentage={stability}", "--max-trials=20",
    ]
    if request_count:  # slow models: windows of N requests rather than of N milliseconds
        command += ["--measurement-mode=count_windows", f"--measurement-request-count={request_count}"]
    else:
        command += [f"--measurement-interval={measurement_ms}"]
    if csv_file:
        command += ["-f", str(csv_file)]
    return command


def run(command: list[str], timeout: float = 1800) -> str:
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(
        p for p in (str(library_dir()), env.get("LD_LIBRARY_PATH")) if p)
    out = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout)
    if out.returncode:
        raise RuntimeError(f"perf_analyzer failed ({out.returncode}):\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    return out.stdout


def sweep(url_for: dict[str, str], models: list[str], concurrency: str, batch_size: int,
          request_count: int | None, measurement_ms: int) -> list[dict]:
    """perf_analyzer on each model over each protocol; `concurrency` is its start:end:step or
    a list of levels ("1,4,16"), each level then a run of its own."""
    ranges = [f"{c}:{c}:1" for c in concurrency.split(",")] if "," in concurrency else [concurrency]
    rows = []
    for protocol, url in url_for.items():
        for model in models:
            for levels in ranges:
                rows += _one_run(protocol, url, url_for.get("grpc"), model, levels, batch_size,
                                 request_count, measurement_ms)
    return rows


def _one_run(protocol: str, url: str, grpc_url: str | None, model: str, concurrency: str, batch_size: int,
             request_count: int | None, measurement_ms: int) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        csv_file = Path(tmp) / "out.csv"
        command = perf_analyzer_command(model, url, protocol, concurrency, batch_size,
                                        measurement_ms, request_count, csv_file)
        print("$", shlex.join(command), flush=True)
        before = executions(grpc_url)
        try:
            run(command)
        except RuntimeError as error:  # one unstable model must not lose the others
            print(f"  {model} {protocol}: {str(error).splitlines()[-1]}", flush=True)
            return []
        batches = average_batches(before, executions(grpc_url))
        measured = sorted(csv.DictReader(io.StringIO(csv_file.read_text())), key=lambda r: int(r["Concurrency"]))
    rows = []
    for row in measured:
        rows.append({
            "model": model, "protocol": protocol, "batch_size": batch_size,
            "concurrency": int(row["Concurrency"]),
            "inferences_per_s": float(row["Inferences/Second"]),
            "p50_ms": int(row["p50 latency"]) / 1000,
            "p95_ms": int(row["p95 latency"]) / 1000,
            # over the whole run, warm-up and every level of a range included
            "average_batch": batches,
            "command": shlex.join(command[1:]),
        })
        print(f"  {model} {protocol} c={rows[-1]['concurrency']}: "
              f"{rows[-1]['inferences_per_s']:.2f} infer/s, p50 {rows[-1]['p50_ms']:.1f} ms, "
              f"p95 {rows[-1]['p95_ms']:.1f} ms, executions' average batch {batches}", flush=True)
    return rows


def executions(grpc_url: str | None) -> dict[str, tuple[int, int]]:
    """Each model's (inferences, executions) so far, from the server's own statistics."""
    if not grpc_url:
        return {}
    import tritonclient.grpc as grpcclient

    with grpcclient.InferenceServerClient(grpc_url) as client:
        stats = client.get_inference_statistics(as_json=True)["model_stats"]
    return {s["name"]: (int(s.get("inference_count", 0)), int(s.get("execution_count", 0))) for s in stats}


def average_batches(before: dict, after: dict) -> dict[str, float]:
    """Frames per execution of each model that ran in between: what dynamic batching merged."""
    out = {}
    for name, (inferences, runs) in after.items():
        inferences -= before.get(name, (0, 0))[0]
        runs -= before.get(name, (0, 0))[1]
        if runs > 0 and name in specs.NETWORKS:
            out[name] = round(inferences / runs, 2)
    return out


def write_results(rows: list[dict], label: str, command_line: str) -> Path:
    path = RESULTS / f"perf_analyzer_{label}.md"
    lines = [
        f"# perf_analyzer: {label}", "",
        f"- produced by: `{command_line}`",
        f"- machine: {machine()}",
        f"- date: {time.strftime('%Y-%m-%d')}", "",
        "| model | protocol | batch | concurrency | inferences/s | p50 ms | p95 ms | unet frames per execution |",
        "|---|---|---|---|---|---|---|---|",
    ] + [
        f"| {r['model']} | {r['protocol']} | {r['batch_size']} | {r['concurrency']} | "
        f"{r['inferences_per_s']:.2f} | {r['p50_ms']:.3g} | {r['p95_ms']:.3g} | "
        f"{r.get('average_batch', {}).get('unet', '')} |" for r in rows
    ] + ["", "Commands (perf_analyzer from tritonclient 2.51.0):", ""] + \
        sorted({f"    perf_analyzer {r['command']}" for r in rows})
    return publish(path, lines, rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.perf_analyzer", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--url", help="gRPC host:port of a running server (HTTP is assumed on port-1)")
    target.add_argument("--local", action="store_true", help="start the local server for the run")
    p.add_argument("--onnx-repository", type=Path, default=Path("model_repository"))
    p.add_argument("--models", default="musetalk," + ",".join(specs.NETWORKS))
    p.add_argument("--protocols", default="grpc,http")
    p.add_argument("--concurrency", default="1:4:3",
                   help="perf_analyzer's start:end:step, or levels run one by one: 1,4,16")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--request-count", type=int, default=None,
                   help="count windows of N requests (for slow CPU runs) instead of time windows")
    p.add_argument("--measurement-ms", type=int, default=5000)
    p.add_argument("--label", default="run", help="results file name: perf_analyzer_<label>.md")
    args = p.parse_args(argv)

    command_line = invocation("benchmarks.perf_analyzer", argv)
    models = args.models.split(",")
    protocols = args.protocols.split(",")
    server = None
    if args.local:
        from triton_local.launch import start
        from triton_local.server import Ports

        server = start(args.onnx_repository, Ports.free(), BUILD / "perf_repository")
        grpc_url, http_url = server.grpc_url, server.http_url
    else:
        grpc_url, http_url = args.url, http_url_beside(args.url)
    try:
        urls = {"grpc": grpc_url, "http": http_url}
        rows = sweep({k: urls[k] for k in protocols}, models, args.concurrency, args.batch_size,
                     args.request_count, args.measurement_ms)
    finally:
        if server:
            server.stop()
    print(f"results: {write_results(rows, args.label, command_line)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
