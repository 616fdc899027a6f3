"""The local tritonserver leaves no process and no shared memory behind, whichever way it stops."""
from __future__ import annotations

import os
import signal
import subprocess

import psutil

from client.readiness import wait_for
from support import BUILD
from triton_local.server import BACKENDS, SHM_PREFIX, STUB, LocalTriton, Ports, remove_leftovers


def test_stubs_exit_when_tritonserver_is_killed(triton):
    server = LocalTriton(triton.repository, Ports.free(), log_file=BUILD / "triton-killed.log").start()
    children = psutil.Process(server.process.pid).children(recursive=True)
    assert len(children) == 5  # one python-backend stub per network
    os.kill(server.process.pid, signal.SIGKILL)  # a crash: tritonserver cleans up nothing
    assert wait_for(lambda: not any(c.is_running() and c.status() != psutil.STATUS_ZOMBIE
                                    for c in children), 10, 0.1), \
        "python-backend stubs outlived their tritonserver"
    server.stop()  # and stopping what already died is fine


def test_start_removes_what_an_earlier_crash_left(triton):
    stub = str(BACKENDS / "python" / STUB)
    orphan = subprocess.Popen([stub, "600"], executable="/bin/sleep")  # looks like a stub, no tritonserver
    region = f"/dev/shm/{SHM_PREFIX}test-{os.getpid()}"
    with open(region, "wb") as f:
        f.write(b"\0" * 4096)
    try:
        # Right after exec, /proc/<pid>/cmdline can still read empty on a busy machine.
        assert wait_for(lambda: psutil.Process(orphan.pid).cmdline()[:1] == [stub], 5, 0.05)
        assert orphan.pid in remove_leftovers()
        orphan.wait(5)  # ended (it would sleep 10 minutes): no TimeoutExpired
        assert not os.path.exists(region)
        # The running server's own stubs and regions are left alone: it still serves.
        assert triton.ready()
        assert len(psutil.Process(triton.process.pid).children()) == 5
    finally:
        orphan.kill()
        if os.path.exists(region):
            os.unlink(region)


LAUNCHER = """
import sys, time
from triton_local.server import LocalTriton, Ports
server = LocalTriton(sys.argv[1], Ports(*map(int, sys.argv[2:5])), log_file=sys.argv[5]).start()
print(server.process.pid, flush=True)
time.sleep(600)
"""


def test_the_server_dies_with_the_process_that_started_it(triton):
    """A launcher killed outright (no chance to clean up) takes tritonserver and its stubs along."""
    import sys

    ports = Ports.free()
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER, str(triton.repository), str(ports.http),
                                 str(ports.grpc), str(ports.metrics), str(BUILD / "triton-orphan.log")],
                                stdout=subprocess.PIPE, text=True)
    server = psutil.Process(int(launcher.stdout.readline()))
    family = [server, *server.children(recursive=True)]
    launcher.kill()
    launcher.wait()
    assert wait_for(lambda: not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in family),
                    15, 0.1), "tritonserver outlived the process that started it"
