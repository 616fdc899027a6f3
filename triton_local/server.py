"""Start and stop a real tritonserver on a machine without a GPU or Docker.

The binary comes from the nvidia-pytriton wheel installed in the server's own
environment (.venv-triton: numpy<2, onnxruntime, openvino). Every pitfall
handled here is listed in shared/design/triton-local.md.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from triton_local.repository import PROJECT_ROOT

DEFAULT_VENV = PROJECT_ROOT / ".venv-triton"
BUILD = PROJECT_ROOT / "build"


class ServerError(RuntimeError):
    """The local server could not be started, or died."""


@dataclass(frozen=True)
class Ports:
    http: int = 8000
    grpc: int = 8001
    metrics: int = 8002

    @classmethod
    def free(cls) -> "Ports":
        """Three ports nothing listens on now (for tests running beside a user's server)."""
        socks = [socket.socket() for _ in range(3)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        ports = cls(*(s.getsockname()[1] for s in socks))
        for s in socks:
            s.close()
        return ports


class ServerEnvironment:
    """The python environment that tritonserver's python backend stub runs in."""

    def __init__(self, venv: Path | None = None):
        self.venv = Path(venv or os.environ.get("MUSETALK_TRITON_VENV", DEFAULT_VENV)).resolve()

    @cached_property
    def facts(self) -> dict:
        python = self.venv / "bin" / "python"
        if not python.exists():
            raise ServerError(f"no server environment at {self.venv}: run `make triton-env` first")
        probe = (
            "import json, sys, sysconfig, pytriton, pathlib;"
            "print(json.dumps({'libdir': sysconfig.get_config_var('LIBDIR'),"
            "'version': f'{sys.version_info.major}.{sys.version_info.minor}',"
            "'pytriton': str(pathlib.Path(pytriton.__file__).parent)}))"
        )
        out = subprocess.run([str(python), "-c", probe], capture_output=True, text=True)
        if out.returncode:
            raise ServerError(f"{self.venv} lacks nvidia-pytriton: {out.stderr.strip()[-500:]}")
        return json.loads(out.stdout)

    @property
    def tritonserver(self) -> Path:
        return Path(self.facts["pytriton"]) / "tritonserver" / "bin" / "tritonserver"

    def backend_directory(self, folder: Path) -> Path:
        """A backend folder holding the python backend, SYMLINKED: the binaries find
        their bundled libraries through $ORIGIN-relative RPATHs (pitfall 1)."""
        server = Path(self.facts["pytriton"]) / "tritonserver"
        python = folder / "python"
        python.mkdir(parents=True, exist_ok=True)
        links = {
            "libtriton_python.so": server / "backends" / "python" / "libtriton_python.so",
            "triton_python_backend_utils.py":
                server / "backends" / "python" / "triton_python_backend_utils.py",
            "triton_python_backend_stub":
                server / "python_backend_stubs" / self.facts["version"] / "triton_python_backend_stub",
        }
        for name, target in links.items():
            link = python / name
            if link.is_symlink() or link.exists():
                link.unlink()
            link.symlink_to(target)
        return folder

    def process_env(self) -> dict[str, str]:
        env = dict(os.environ)
        # The stub finds its interpreter through PATH (pitfall 2) and must load
        # this environment's libpython (pitfall 3).
        env["PATH"] = f"{self.venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
        env["LD_LIBRARY_PATH"] = os.pathsep.join(
            p for p in (self.facts["libdir"], env.get("LD_LIBRARY_PATH")) if p
        )
        env.pop("PYTHONPATH", None)
        env.pop("VIRTUAL_ENV", None)
        return env


class LocalTriton:
    """A tritonserver process serving `repository`; a context manager.

    >>> with LocalTriton(repo) as server:
    ...     server.http_url  # "localhost:8000"
    """

    def __init__(self, repository: Path, ports: Ports = Ports(), log_file: Path | None = None,
                 environment: ServerEnvironment | None = None):
        self.repository = Path(repository).resolve()
        self.ports = ports
        self.log_file = Path(log_file or BUILD / "triton.log")
        self.environment = environment or ServerEnvironment()
        self.process: subprocess.Popen | None = None

    @property
    def http_url(self) -> str:
        return f"localhost:{self.ports.http}"

    @property
    def grpc_url(self) -> str:
        return f"localhost:{self.ports.grpc}"

    def command(self) -> list[str]:
        env = self.environment
        backends = env.backend_directory(BUILD / "triton_backends")
        return [
            str(env.tritonserver),
            f"--model-repository={self.repository}",
            f"--backend-directory={backends}",
            f"--http-port={self.ports.http}",
            f"--grpc-port={self.ports.grpc}",
            f"--metrics-port={self.ports.metrics}",
            # No GPU here (pitfall 4).
            "--allow-gpu-metrics=false",
            "--pinned-memory-pool-byte-size=0",
            "--cuda-memory-pool-byte-size=0:0",
            "--exit-timeout-secs=1",
        ]

    def start(self, timeout: float = 600.0) -> "LocalTriton":
        for port in (self.ports.http, self.ports.grpc, self.ports.metrics):
            if _listening(port):
                raise ServerError(f"port {port} is already in use: is another server running?")
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_file.open("wb")
        self.process = subprocess.Popen(
            self.command(), stdout=log, stderr=subprocess.STDOUT,
            env=self.environment.process_env(), start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerError(
                    f"tritonserver exited with code {self.process.returncode}; "
                    f"last lines of {self.log_file}:\n{self.log_tail()}"
                )
            if self.ready():
                return self
            time.sleep(0.25)
        self.stop()
        raise ServerError(f"tritonserver not ready after {timeout:.0f} s:\n{self.log_tail()}")

    def ready(self) -> bool:
        """True when the server and every model in its repository are ready."""
        return http_ok(f"http://{self.http_url}/v2/health/ready")

    def stop(self, timeout: float = 15.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def resident_bytes(self) -> int:
        """Resident memory of the server and its python-backend stubs together."""
        import psutil

        if self.process is None:
            return 0
        root = psutil.Process(self.process.pid)
        return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def __enter__(self) -> "LocalTriton":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def http_url_beside(grpc_url: str) -> str:
    """The HTTP endpoint of a server known by its gRPC one: Triton's defaults
    put HTTP one port below gRPC (8000 and 8001)."""
    host, port = grpc_url.rsplit(":", 1)
    return f"{host}:{int(port) - 1}"


def http_ok(url: str) -> bool:
    """True when `url` answers 200 (readiness probes: anything else means not yet)."""
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return False


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0
