"""The local server beside the runtime under it: what does serving through tritonserver cost?

    python -m benchmarks.local_server                                  # full size, batch 2
    python -m benchmarks.local_server --onnx-repository build/tiny_onnx --batch 4 --requests 12

One run, one machine, side by side:

- in-process: the core (positional_encoding -> unet -> vae_decoder) chained by hand on the
  same ONNX files, with the same runtime the server would use: milliseconds per frame;
- through the local Triton: the `musetalk` ensemble, `--requests` requests of `--batch`
  frames, `--concurrency` of them in flight, staggered (the second sent when the first is
  half done, as the in-process time says, then one whenever one is answered): the unet of
  one request runs while the decoder of the one before it does, as in a session or under
  perf_analyzer; once per way of sharing the cores among the models (`--variants`): the
  first answer's latency and the steady state in milliseconds per frame (from the first
  answer to the last, over the frames answered after the first).

Variants: `spin` (every model's onnxruntime pool takes every core, idle threads spinning:
the local server's old default), `nospin` (the same pools, idle threads sleeping), `lock`
(one model computes at a time with every core; the others wait on a file lock), `lock+nospin`,
and `auto` (what `make serve` chooses on this machine: bf16 where the CPU has it). With
`--perf-analyzer`, perf_analyzer also measures the ensemble on the first variant's server.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from concurrent.futures import wait
from pathlib import Path

import numpy as np

from benchmarks.perf_analyzer import sweep
from benchmarks.provenance import invocation, machine, publish
from client import MuseTalkClient
from contract import specs
from contract.layout import model_path
from contract.runners import open_runner
from triton_local.repository import Runtime, generate
from triton_local.runtimes import CUDA, runtimes_for
from triton_local.server import BUILD, LocalTriton, Ports

RESULTS = Path(__file__).resolve().parent / "results"
CORE = ("positional_encoding", "unet", "vae_decoder")
VARIANTS = {
    "spin": {"spin": True},
    "nospin": {"spin": False},
    "lock": {"spin": True, "lock": True},
    "lock+nospin": {"spin": False, "lock": True},
    "auto": {},
}


def inputs(batch: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((batch, 50, 384)).astype(np.float32),
            rng.standard_normal((batch, 8, 32, 32)).astype(np.float32))


def in_process(repository: Path, batch: int, repeats: int, runtime: Runtime) -> dict:
    run = {n: open_runner(model_path(repository, n), runtime.name, runtime.precision, spin=runtime.spin)
           for n in CORE}
    audio, latents = inputs(batch)

    def core():
        embedded = run["positional_encoding"]({"audio_chunk": audio})["audio_embedding"]
        pred = run["unet"]({"latents": latents, "audio_embedding": embedded})["pred_latents"]
        return run["vae_decoder"]({"pred_latents": pred})["face"]

    started = time.perf_counter()
    core()
    first = time.perf_counter() - started
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        core()
        times.append(time.perf_counter() - started)
    return {"first_ms": first * 1e3, "ms_per_frame": statistics.median(times) * 1e3 / batch}


def runtimes(repository: Path, variant: str, target: Path) -> dict[str, Runtime]:
    if variant == "auto":
        return runtimes_for(repository)
    options = VARIANTS[variant]
    lock = str(target / "cpu.lock") if options.get("lock") else ""
    return {n: Runtime(spin=options["spin"], cpu_lock=lock) for n in specs.NETWORKS}


def through_triton(repository: Path, variant: str, batch: int, requests: int, concurrency: int,
                   stagger_s: float, perf_analyzer: bool = False) -> list[dict]:
    target = BUILD / "bench_local_repository"
    generate(target, repository, runtimes(repository, variant, target))
    audio, latents = inputs(batch)
    with LocalTriton(target, Ports.free(), log_file=BUILD / "bench_local_triton.log") as server, \
            MuseTalkClient(server.grpc_url, max_in_flight=concurrency) as client:
        started = time.perf_counter()
        answered: list[float] = []
        pending = set()
        sent = 0
        while len(answered) < requests:
            while sent < requests and len(pending) < concurrency:
                future = client.submit(client.musetalk, audio, latents)
                future.add_done_callback(lambda f: answered.append(time.perf_counter()))
                pending.add(future)
                sent += 1
                if sent < concurrency:
                    time.sleep(stagger_s)
            done, pending = wait(pending, return_when="FIRST_COMPLETED")
            for f in done:
                f.result()
        answered.sort()
        later = [t for t in answered if t > answered[0] + 0.05]  # answers merged with the first are not after it
        steady = (answered[-1] - answered[0]) / (len(later) * batch)
        rows = [{"path": f"local Triton ({variant})", "first_ms": (answered[0] - started) * 1e3,
                 "ms_per_frame": steady * 1e3}]
        if perf_analyzer:
            (row,) = sweep({"grpc": server.grpc_url}, ["musetalk"], f"{concurrency}:{concurrency}:1", batch,
                           request_count=4, measurement_ms=0)
            rows.append({"path": f"perf_analyzer on local Triton ({variant}), c={concurrency}",
                         "first_ms": float("nan"), "ms_per_frame": 1e3 / row["inferences_per_s"],
                         "command": row["command"]})
        return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.local_server", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--onnx-repository", type=Path, default=Path("model_repository"))
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--requests", type=int, default=8, help="ensemble requests per variant")
    p.add_argument("--concurrency", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3, help="in-process repetitions")
    p.add_argument("--variants", default=None, help=f"any of {', '.join(VARIANTS)} (default: all on a CPU; "
                   "auto, the GPU, where the local server runs on one)")
    p.add_argument("--perf-analyzer", action="store_true", help="perf_analyzer on the first variant's server too")
    p.add_argument("--label", default="full_cpu")
    args = p.parse_args(argv)

    rows = []
    on_gpu = runtimes_for(args.onnx_repository)["unet"] == CUDA
    # The runtime under the server, alone: CUDA where the server runs on the GPU, else both CPU pools.
    direct = {"onnxruntime CUDA": CUDA} if on_gpu else \
        {"spin": Runtime(spin=True), "nospin": Runtime(spin=False)}
    for label, runtime in direct.items():
        row = {"path": f"in-process ({label})", **in_process(args.onnx_repository, args.batch, args.repeats, runtime)}
        print(json.dumps(row), flush=True)
        rows.append(row)
    stagger_s = rows[0]["ms_per_frame"] * args.batch / 1e3 / args.concurrency
    args.variants = args.variants or ("auto" if on_gpu else ",".join(VARIANTS))
    for index, variant in enumerate(args.variants.split(",")):
        for row in through_triton(args.onnx_repository, variant, args.batch, args.requests, args.concurrency,
                                  stagger_s, perf_analyzer=args.perf_analyzer and index == 0):
            print(json.dumps(row), flush=True)
            rows.append(row)
    reference = rows[0]["ms_per_frame"]
    path = RESULTS / f"local_server_{args.label}.md"
    lines = [
        f"# The local server beside the runtime under it ({args.label})", "",
        f"- produced by: `{invocation('benchmarks.local_server', argv)}`",
        f"- machine: {machine()}",
        f"- date: {time.strftime('%Y-%m-%d')}; onnxruntime fp32 (but `auto`: {'the GPU' if on_gpu else 'this CPU'}'s "
        f"choice); batch {args.batch}; "
        f"{args.requests} ensemble requests, {args.concurrency} in flight", "",
        "| path | first answer ms | steady ms per frame | vs in-process |", "|---|---|---|---|",
    ] + [f"| {r['path']} | {'' if r['first_ms'] != r['first_ms'] else round(r['first_ms'])} | "
         f"{r['ms_per_frame']:.3g} | {r['ms_per_frame'] / reference:.2f}x |" for r in rows]
    lines += ["", "perf_analyzer (tritonclient 2.51.0): " + ", ".join(f"`{r['command']}`" for r in rows
                                                                 if "command" in r)] if args.perf_analyzer else []
    print(f"results: {publish(path, lines, rows)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
