"""The front end as its own process (uvicorn), as users run it beside Triton.

Used by `make serve` and `make demo` with triton_local.launch, so both run the
service as a user would: tritonserver and uvicorn as separate processes,
talking over gRPC and HTTP.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from triton_local.server import BUILD, ServerError, http_ok


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
            if http_ok(f"{self.url}/healthz"):
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

