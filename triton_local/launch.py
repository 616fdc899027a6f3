"""Generate the local repository and start tritonserver on it, showing models come up.

The one way the local server is started: by `make triton`, `make serve`, the
demo and the perf_analyzer benchmark alike.
"""
from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

from tqdm import tqdm

from contract import specs
from triton_local.repository import generate
from triton_local.runtimes import choose, describe
from triton_local.server import BUILD, LocalTriton, Ports
from triton_local.supervisor import Supervisor


def start(onnx_repository: Path, ports: Ports = Ports(), target: Path = BUILD / "triton_repository",
          progress: bool = True) -> LocalTriton:
    choices = choose(onnx_repository)
    generate(target, onnx_repository, {name: choice.runtime for name, choice in choices.items()})
    print(f"local repository {target} {describe(choices)}", flush=True)
    server = LocalTriton(target, ports)
    started = time.perf_counter()
    with tqdm(total=len(specs.MODELS), desc="tritonserver: models ready", unit="model",
              disable=not progress) as bar:
        def show_ready_models() -> None:
            bar.update(sum(map(server.model_ready, specs.MODELS)) - bar.n)

        server.start(on_wait=show_ready_models)
        bar.update(bar.total - bar.n)
    print(f"tritonserver ready in {time.perf_counter() - started:.1f} s "
          f"({server.resident_bytes() / 2**30:.2f} GiB resident)\n"
          f"  HTTP     http://{server.http_url}\n  gRPC     {server.grpc_url}\n"
          f"  metrics  {server.metrics_url}", flush=True)
    return server


def serve_until_stopped(*processes: subprocess.Popen, supervisor: Supervisor | None = None) -> bool:
    """Block until Ctrl-C or SIGTERM (True: a requested stop), or until one of `processes`
    exits by itself or `supervisor` gives up on its server (False: the caller says which).
    A supervised tritonserver that dies is restarted meanwhile: the rest go on."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        while all(p.poll() is None for p in processes) and (supervisor is None or supervisor.gave_up is None):
            time.sleep(0.5)
        return False
    except (KeyboardInterrupt, SystemExit):
        print("stopping...", flush=True)
        return True
