"""The whole local service in one context manager: local Triton + the FastAPI front end.

Used by `make serve`, `make demo` and the end-to-end benchmark, so that all
three run the service exactly as a user would: tritonserver and uvicorn as
separate processes, talking over gRPC and HTTP.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from tqdm import tqdm

from client import specs
from triton_local.repository import generate
from triton_local.runtimes import DEFAULT_RUNTIMES
from triton_local.server import BUILD, LocalTriton, Ports, ServerError


def start_triton(onnx_repository: Path, ports: Ports = Ports(), progress: bool = True) -> LocalTriton:
    """Generate the local repository, start tritonserver and show the models coming up."""
    target = BUILD / "triton_repository"
    generate(target, onnx_repository, DEFAULT_RUNTIMES)
    server = LocalTriton(target, ports)
    started = time.perf_counter()
    bar = tqdm(total=len(specs.MODELS), desc="tritonserver: models ready", unit="model",
               disable=not progress)
    import threading

    done = threading.Event()

    def watch():
        seen = 0
        while not done.wait(0.5):
            ready = sum(_ok(f"http://{server.http_url}/v2/models/{m}/ready") for m in specs.MODELS)
            bar.update(max(0, ready - seen))
            seen = max(seen, ready)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        server.start()
    finally:
        done.set()
        watcher.join()
        bar.update(bar.total - bar.n if server.process and server.process.poll() is None else 0)
        bar.close()
    print(f"tritonserver ready in {time.perf_counter() - started:.1f} s "
          f"({server.resident_bytes() / 2**30:.2f} GiB resident): HTTP {server.http_url}, "
          f"gRPC {server.grpc_url}, metrics localhost:{server.ports.metrics}", flush=True)
    return server


class FrontEnd:
    """uvicorn serving frontend.app in its own process."""

    def __init__(self, triton_grpc: str, port: int = 8080, env: dict[str, str] | None = None,
                 log_file: Path = BUILD / "frontend.log"):
        self.port = port
        self.url = f"http://localhost:{port}"
        self.log_file = log_file
        self.env = {**os.environ, "MUSETALK_TRITON_URL": triton_grpc, **(env or {})}
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 60) -> "FrontEnd":
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        with self.log_file.open("wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "uvicorn", "--factory", "frontend.app:create_app",
                 "--host", "0.0.0.0", "--port", str(self.port)],
                stdout=log, stderr=subprocess.STDOUT, env=self.env,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerError(f"the front end exited; see {self.log_file}")
            if _ok(f"{self.url}/healthz"):
                return self
            time.sleep(0.2)
        self.stop()
        raise ServerError(f"the front end did not answer in {timeout:.0f} s; see {self.log_file}")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()


def _ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except Exception:  # noqa: BLE001 - not up yet
        return False
