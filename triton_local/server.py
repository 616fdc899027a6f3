"""Start and stop a real tritonserver on a machine without a GPU or Docker.

The binary comes from the nvidia-pytriton wheel installed in the server's own
environment (.venv-triton: numpy<2, onnxruntime-gpu, openvino). docs/deploy/local-server.md
lists every pitfall handled here, numbered as the comments below cite them.

The server leaves nothing behind, whichever way it stops: stop() ends the whole
process group (python-backend stubs included) even after tritonserver died on
its own; every stub exits by itself when its tritonserver is gone
(python_model.py); tritonserver ends when the process that started it ends, even
killed outright; and start() first removes what an earlier crash left (stubs
of this project's backend folder whose tritonserver is gone, and shared-memory
regions that no process maps any more).

Each server's python backend has shared memory of its own: its regions are named
after its HTTP port (two servers on one machine never share one, whatever the
backend's own naming does), and sized up front for the largest execution any of
our models makes, so that a region never has to grow while requests are in flight:
growing it under concurrent large payloads is where the python backend has been
seen to abort the whole server (`boost::interprocess::lock_exception`, Triton
issues #8882 and #5949). triton_local.supervisor restarts a server that died anyway.
"""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from client.readiness import wait_for
from contract import specs
from triton_local.processes import LOOPBACK, group_alive, http_ok, listening, signal_group, start_child
from triton_local.repository import PROJECT_ROOT

DEFAULT_VENV = PROJECT_ROOT / ".venv-triton"
BUILD = PROJECT_ROOT / "build"
BACKENDS = BUILD / "triton_backends"
STUB = "triton_python_backend_stub"
SHM_PREFIX = "musetalk_triton_shm_"  # every region of our servers: musetalk_triton_shm_<http port>_<uuid>
DEFAULT_SHM_PREFIX = "triton_python_backend_shm_region_"  # the backend's own naming (servers before ours)
LEFTOVER_AGE_S = 60.0  # an unmapped region younger than this may be a starting server's: left alone
MIB = 2**20


# What no client of ours needs, and what an intruder would want: loading models (code), reading or
# mapping shared memory, tracing and logging settings. Health, metadata, model config, statistics
# and inference stay open to those who reach the server (deploy/ lets only the front ends).
RESTRICTED = "model-repository,shared-memory,trace,logging"


def restricted_api_flags(header: tuple[str, str] | None) -> list[str]:
    """tritonserver's flags that put RESTRICTED behind a header (name, value), on HTTP and gRPC."""
    if header is None:
        return []
    name, value = header
    return [f"--http-restricted-api={RESTRICTED}:{name}={value}",
            f"--grpc-restricted-protocol={RESTRICTED}:{name}={value}"]


def shared_memory_bytes() -> int:
    """Each python-backend model's shared memory, made once: room for the inputs and outputs of
    the largest execution of any of our models (the audio encoder's 8 segments: ~100 MB), with
    half as much again to spare. Pages are only used once touched (tmpfs), so the size costs
    nothing until a request needs it."""
    largest = max(spec.max_batch_size * spec.bytes_per_item for spec in specs.NETWORKS.values())
    return -(-int(largest * 1.5) // MIB) * MIB


class ServerError(RuntimeError):
    """The local server could not be started, or died."""


@dataclass(frozen=True)
class Ports:
    http: int = 8000
    grpc: int = 8001
    metrics: int = 8002

    @classmethod
    def free(cls) -> Ports:
        """Three ports nothing listens on now (for tests running beside a user's server)."""
        socks = [socket.socket() for _ in range(3)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        ports = cls(*(s.getsockname()[1] for s in socks))
        for s in socks:
            s.close()
        return ports

    @classmethod
    def defaults_or_free(cls) -> Ports:
        """Triton's usual ports when all three are free, else three free ones."""
        default = cls()
        return default if not any(map(listening, (default.http, default.grpc, default.metrics))) \
            else cls.free()


class ServerEnvironment:
    """The python environment that tritonserver's python backend stub runs in."""

    def __init__(self, venv: Path | None = None):
        self.venv = Path(venv or os.environ.get("MUSETALK_TRITON_VENV", DEFAULT_VENV)).resolve()

    @cached_property
    def facts(self) -> dict:
        python = self.venv / "bin" / "python"
        if not python.exists():
            raise ServerError(f"no server environment at {self.venv}: run `make triton-env` first")
        # Found, not imported: importing pytriton needs its client's packages, which the
        # server (tritonserver and the stub) never uses.
        probe = (
            "import json, sys, sysconfig, importlib.util;"
            "spec = importlib.util.find_spec('pytriton');"
            "print(json.dumps({'libdir': sysconfig.get_config_var('LIBDIR'),"
            "'version': f'{sys.version_info.major}.{sys.version_info.minor}',"
            "'pytriton': spec.submodule_search_locations[0] if spec else None}))"
        )
        out = subprocess.run([str(python), "-c", probe], capture_output=True, text=True)
        facts = json.loads(out.stdout) if not out.returncode else {}
        if not facts.get("pytriton"):
            raise ServerError(f"{self.venv} lacks nvidia-pytriton: run `make triton-env` "
                              f"{out.stderr.strip()[-500:]}")
        return facts

    @property
    def server_dir(self) -> Path:
        return Path(self.facts["pytriton"]) / "tritonserver"

    @property
    def tritonserver(self) -> Path:
        return self.server_dir / "bin" / "tritonserver"

    def backend_directory(self, folder: Path = BACKENDS) -> Path:
        """A backend folder holding the python backend, SYMLINKED: the binaries find
        their bundled libraries through $ORIGIN-relative RPATHs (pitfall 1)."""
        server = self.server_dir
        python = folder / "python"
        python.mkdir(parents=True, exist_ok=True)
        links = {
            "libtriton_python.so": server / "backends" / "python" / "libtriton_python.so",
            "triton_python_backend_utils.py":
                server / "backends" / "python" / "triton_python_backend_utils.py",
            STUB: server / "python_backend_stubs" / self.facts["version"] / STUB,
        }
        for name, target in links.items():
            relink(python / name, target)
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
    ...     server.http_url  # "127.0.0.1:8000"
    """

    def __init__(self, repository: Path, ports: Ports = Ports(), log_file: Path | None = None,
                 environment: ServerEnvironment | None = None, admin_header: tuple[str, str] | None = None):
        self.repository = Path(repository).resolve()
        self.ports = ports
        self.admin_header = admin_header  # (name, value): what its restricted APIs ask for (RESTRICTED)
        self.log_file = Path(log_file or BUILD / "triton.log")
        self.environment = environment or ServerEnvironment()
        self.process: subprocess.Popen | None = None

    @property
    def http_url(self) -> str:
        return f"{LOOPBACK}:{self.ports.http}"

    @property
    def grpc_url(self) -> str:
        return f"{LOOPBACK}:{self.ports.grpc}"

    @property
    def metrics_url(self) -> str:
        return f"http://{LOOPBACK}:{self.ports.metrics}/metrics"

    @property
    def shm_prefix(self) -> str:
        """Its regions' names begin so: its own (no other running server has its HTTP port)."""
        return f"{SHM_PREFIX}{self.ports.http}_"

    def command(self) -> list[str]:
        return [
            str(self.environment.tritonserver),
            f"--model-repository={self.repository}",
            f"--backend-directory={self.environment.backend_directory()}",
            # Loopback only: whoever reaches Triton can run, load and inspect anything on it; the
            # front end beside it is the way in (deploy/ closes it with a NetworkPolicy instead).
            f"--http-address={LOOPBACK}", f"--http-port={self.ports.http}",
            f"--grpc-address={LOOPBACK}", f"--grpc-port={self.ports.grpc}",
            f"--metrics-address={LOOPBACK}", f"--metrics-port={self.ports.metrics}",
            # No GPU here (pitfall 4).
            "--allow-gpu-metrics=false",
            "--pinned-memory-pool-byte-size=0",
            "--cuda-memory-pool-byte-size=0:0",
            "--exit-timeout-secs=1",
            # Shared memory of its own, never grown while serving (the module's docstring says why).
            f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
            f"--backend-config=python,shm-default-byte-size={shared_memory_bytes()}",
            f"--backend-config=python,shm-growth-byte-size={shared_memory_bytes() // 2}",
            *restricted_api_flags(self.admin_header),
        ]

    def start(self, timeout: float = 600.0, on_wait: Callable[[], None] | None = None,
              append_log: bool = False) -> LocalTriton:
        """Start and wait until every model is ready; `on_wait` is called at each poll
        (to show progress). `append_log` keeps what the log holds (a restart after a crash)."""
        for port in (self.ports.http, self.ports.grpc, self.ports.metrics):
            if listening(port):
                raise ServerError(f"port {port} is already in use: is another server running?")
        remove_leftovers(own_prefix=self.shm_prefix)
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        with self.log_file.open("ab" if append_log else "wb") as log:
            # A session of its own: stop() signals the whole group, stubs included. And it
            # dies with this process, however that ends (Ctrl-C, kill, a crash).
            self.process = start_child(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                       env=self.environment.process_env(), start_new_session=True)
        def ready() -> bool:
            if on_wait:
                on_wait()
            return self.ready()

        if wait_for(ready, timeout, give_up=lambda: self.process.poll() is not None):
            return self
        if (code := self.process.poll()) is not None:
            self.stop()
            raise ServerError(
                f"tritonserver exited with code {code}; {self.load_failures()}"
                f"last lines of {self.log_file}:\n{self.log_tail()}"
            )
        self.stop()
        raise ServerError(f"tritonserver not ready after {timeout:.0f} s:\n{self.log_tail()}")

    def ready(self) -> bool:
        """True when the server and every model in its repository are ready."""
        return http_ok(f"http://{self.http_url}/v2/health/ready")

    def model_ready(self, model: str) -> bool:
        return http_ok(f"http://{self.http_url}/v2/models/{model}/ready")

    def stop(self, timeout: float = 15.0) -> None:
        """Stop tritonserver and every process of its group, even if it died already."""
        if self.process is None:
            return
        group = self.process.pid  # the session leader's pid is the group id
        # The stubs of a server that died have nothing left to finish: they go at once.
        signal_group(group, signal.SIGTERM if self.process.poll() is None else signal.SIGKILL)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            signal_group(group, signal.SIGKILL)
            self.process.wait()
        # Stubs stop within a second of their server; whatever is still there goes now.
        if not wait_for(lambda: not group_alive(group), 5.0, 0.1):
            signal_group(group, signal.SIGKILL)
        self.process = None  # a second stop must not signal a group whose id was reused

    def resident_bytes(self) -> int:
        """Resident memory of the server and its python-backend stubs together."""
        import psutil

        if self.process is None:
            return 0
        root = psutil.Process(self.process.pid)
        return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])

    def load_failures(self) -> str:
        """"models that failed to load:\n  unet: <why>\n" from the log (before its tail's tables)."""
        try:
            text = self.log_file.read_text(errors="replace")
        except OSError:
            return ""
        failed = {name: why.split("\\n")[0] for name, why in
                  re.findall(r"failed to load '([^']+)' version \d+: (.*)", text)}
        if not failed:
            return ""
        return "models that failed to load:\n" + "".join(f"  {name}: {why}\n" for name, why in failed.items())

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def __enter__(self) -> LocalTriton:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def remove_leftovers(backends: Path = BACKENDS, own_prefix: str | None = None) -> list[int]:
    """Kill python-backend stubs started from `backends` whose tritonserver is gone
    (an earlier crash), and unlink shared-memory regions left behind: those of `own_prefix`
    (a server about to start on ports of its own: they are a dead predecessor's), and any other
    of ours that no process maps and that is older than LEFTOVER_AGE_S (a younger one may be a
    server starting right now, between making its region and mapping it). Returns the pids killed."""
    import psutil

    stub = str(backends / "python" / STUB)
    killed = []
    for process in psutil.process_iter(["cmdline"]):
        try:
            if (process.info["cmdline"] or [None])[0] == stub and not _has_tritonserver_parent(process):
                process.kill()
                killed.append(process.pid)
        except psutil.Error:
            pass  # gone meanwhile
    psutil.wait_procs([psutil.Process(p) for p in killed if psutil.pid_exists(p)], timeout=5)
    _remove_regions(own_prefix)
    return killed


def _remove_regions(own_prefix: str | None, shm: Path = Path("/dev/shm")) -> None:
    regions = [r for prefix in (SHM_PREFIX, DEFAULT_SHM_PREFIX) for r in shm.glob(f"{prefix}*")]
    if not regions:
        return
    mapped = set()
    for maps in Path("/proc").glob("[0-9]*/maps"):
        try:
            mapped.update(line.rsplit(" ", 1)[-1] for line in maps.read_text().splitlines()
                          if SHM_PREFIX in line or DEFAULT_SHM_PREFIX in line)
        except OSError:
            continue  # the process ended meanwhile, or is not ours to read
    now = time.time()
    for region in regions:
        # Only our own user's: another user's (or another container's, whose processes
        # /proc does not show) may be in use, and /dev/shm's sticky bit forbids it anyway.
        try:
            stat = region.stat()
            own = own_prefix is not None and region.name.startswith(own_prefix)
            abandoned = str(region) not in mapped and now - stat.st_mtime > LEFTOVER_AGE_S
            if (own or abandoned) and stat.st_uid == os.getuid():
                region.unlink()
        except OSError:
            continue  # removed meanwhile


def _has_tritonserver_parent(process) -> bool:
    parent = process.parent()
    return parent is not None and parent.name() == "tritonserver"


def relink(link: Path, target: Path) -> None:
    """Make `link` a symbolic link to `target`, whatever was there before."""
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(target)


def http_url_beside(grpc_url: str) -> str:
    """The HTTP endpoint of a server known by its gRPC one: Triton's defaults
    put HTTP one port below gRPC (8000 and 8001)."""
    host, port = grpc_url.rsplit(":", 1)
    return f"{host}:{int(port) - 1}"
