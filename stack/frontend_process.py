"""The front end as its own process (python -m frontend: uvicorn, and a drain on SIGTERM), as
users run it beside Triton.

`make serve` and `make demo` run the service as a user would: tritonserver and
uvicorn as separate processes, talking over gRPC and HTTP.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from client.readiness import wait_for
from triton_local.processes import end, http_ok, start_child
from triton_local.server import BUILD, ServerError

# A front end beside the local tritonserver: requests of the size the local server executes at once
# (triton_local.repository.Runtime.chunk): on a CPU no batch is cheaper per frame than another, and
# a smaller one leaves the server sooner, so an urgent request waits less behind it.
LOCAL_SERVER_SETTINGS = {"MUSETALK_BATCH_SIZE": "8"}


class FrontEnd:
    """uvicorn serving frontend.app in its own process."""

    def __init__(self, triton_grpc: str, port: int = 8080, env: dict[str, str] | None = None,
                 log_file: Path = BUILD / "frontend.log", host: str = "127.0.0.1"):
        self.port = port
        self.host = host
        self.url = f"http://localhost:{port}"
        self.log_file = log_file
        self.env = {**os.environ, "MUSETALK_TRITON_URL": triton_grpc, **(env or {})}
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 60) -> FrontEnd:
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        with self.log_file.open("wb") as log:
            self.process = start_child([sys.executable, "-m", "frontend", "--host", self.host, "--port",
                                        str(self.port)], stdout=log, stderr=subprocess.STDOUT, env=self.env)
        if wait_for(lambda: http_ok(f"{self.url}/healthz"), timeout, 0.2,
                    give_up=lambda: self.process.poll() is not None):
            return self
        self.stop()
        raise ServerError(f"the front end did not start in {timeout:.0f} s; see {self.log_file}")

    def wait_until_ready(self, timeout: float) -> bool:
        """Wait for /readyz: Triton ready and the default avatar prepared."""
        return wait_for(lambda: http_ok(f"{self.url}/readyz"), timeout, 0.5,
                        give_up=lambda: self.process.poll() is not None)

    def stop(self) -> None:
        end(self.process, grace_s=15)
