"""Child processes and ports: what starting and stopping a server takes, for the local
tritonserver, the front end, and whatever else the launchers and tests start (nginx, coturn...)."""
from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import urllib.error
import urllib.request

LOOPBACK = "127.0.0.1"


def free_port() -> int:
    """A TCP port nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


_PRCTL = ctypes.CDLL(None, use_errno=True).prctl  # looked up here: the child only calls it
PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """In a child process, before exec: receive SIGTERM when the thread that started it ends
    (start servers from the main thread, or one that lives as long as they should)."""
    _PRCTL(PR_SET_PDEATHSIG, signal.SIGTERM)


def start_child(command: list[str], **popen) -> subprocess.Popen:
    """Popen(command, **popen) for a process that gets SIGTERM when the thread that started it
    ends, however that ends (`end` stops it sooner). Through util-linux's setpriv where there
    is one, which sets that in the child and then execs the command: Python's preexec_fn runs
    Python code between fork and exec, which a process with gRPC threads (a client) cannot
    always survive (gRPC's fork handlers abort the child: seen starting nginx from the test
    process)."""
    setpriv = shutil.which("setpriv")
    if setpriv:
        return subprocess.Popen([setpriv, "--pdeathsig", "TERM", "--", *command], **popen)
    return subprocess.Popen(command, preexec_fn=die_with_parent, **popen)


def end(process: subprocess.Popen | None, grace_s: float = 5.0) -> None:
    """Ask `process` to stop (SIGTERM); after `grace_s`, make it (SIGKILL). Either way reaped."""
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(grace_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def signal_group(group: int, sig: int) -> None:
    try:
        os.killpg(group, sig)
    except ProcessLookupError:
        pass  # nothing of the group is left


def group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
        return True
    except ProcessLookupError:
        return False


def http_ok(url: str) -> bool:
    """True when `url` answers 200 (readiness probes: anything else means not yet)."""
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return False
