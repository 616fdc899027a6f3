"""The local tritonserver leaves no process and no shared memory behind, whichever way it stops; has
shared memory of its own; and, supervised, is started again when it dies."""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from client import MuseTalkClient
from client.readiness import wait_for
from contract import specs
from support import BUILD, ROOT, frames
from triton_local.processes import listening
from triton_local.server import BACKENDS, SHM_PREFIX, STUB, LocalTriton, Ports, remove_leftovers, shared_memory_bytes
from triton_local.supervisor import Supervisor


def instances(grpc_url: str) -> int:
    """The model instances a server runs, as its configs say: one python-backend stub each."""
    with MuseTalkClient(grpc_url) as client:
        return sum(int(group.get("count", 1)) for model in specs.NETWORKS
                   for group in client.model_config(model)["instance_group"])


def test_stubs_exit_when_tritonserver_is_killed(triton):
    server = LocalTriton(triton.repository, Ports.free(), log_file=BUILD / "triton-killed.log").start()
    children = psutil.Process(server.process.pid).children(recursive=True)
    assert len(children) == instances(server.grpc_url) >= len(specs.NETWORKS)  # a stub per instance
    os.kill(server.process.pid, signal.SIGKILL)  # a crash: tritonserver cleans up nothing
    assert wait_for(lambda: not any(c.is_running() and c.status() != psutil.STATUS_ZOMBIE
                                    for c in children), 10, 0.1), \
        "python-backend stubs outlived their tritonserver"
    server.stop()  # and stopping what already died is fine


def test_start_removes_what_an_earlier_crash_left(triton):
    stub = str(BACKENDS / "python" / STUB)
    orphan = subprocess.Popen([stub, "600"], executable="/bin/sleep")  # looks like a stub, no tritonserver
    old = Path(f"/dev/shm/{SHM_PREFIX}test-old-{os.getpid()}")  # a crashed server's, long ago
    young = Path(f"/dev/shm/{SHM_PREFIX}test-young-{os.getpid()}")  # maybe a server starting right now
    own = Path(f"/dev/shm/{SHM_PREFIX}test-own-{os.getpid()}_1")  # the dead predecessor of a server on these ports
    for region in (old, young, own):
        region.write_bytes(b"\0" * 4096)
    an_hour_ago = time.time() - 3600
    os.utime(old, (an_hour_ago, an_hour_ago))
    try:
        # Right after exec, /proc/<pid>/cmdline can still read empty on a busy machine.
        assert wait_for(lambda: psutil.Process(orphan.pid).cmdline()[:1] == [stub], 5, 0.05)
        assert orphan.pid in remove_leftovers(own_prefix=f"{SHM_PREFIX}test-own-{os.getpid()}_")
        orphan.wait(5)  # ended (it would sleep 10 minutes): no TimeoutExpired
        assert not old.exists() and not own.exists()
        assert young.exists()  # unmapped, but too young to be sure it is abandoned
        # The running server's own stubs and regions are left alone: it still serves.
        assert triton.ready()
        assert len(psutil.Process(triton.process.pid).children()) == instances(triton.grpc_url)
        assert list(Path("/dev/shm").glob(f"{triton.shm_prefix}*"))
    finally:
        orphan.kill()
        for region in (old, young, own):
            region.unlink(missing_ok=True)


def test_each_server_has_shared_memory_of_its_own_sized_for_the_largest_batch(triton):
    """Regions named after the server's port (no two servers share one), made big enough up front for
    the audio encoder's 8 segments in and out, so that none grows while requests are in flight."""
    regions = sorted(Path("/dev/shm").glob(f"{triton.shm_prefix}*"))
    assert len(regions) == instances(triton.grpc_url)  # one per python-backend stub
    largest = max(spec.max_batch_size * spec.bytes_per_item for spec in specs.NETWORKS.values())
    assert largest > 90 * 2**20  # 8 x (80 x 3000 in + 1500 x 5 x 384 out) float32
    for region in regions:
        assert region.stat().st_size >= shared_memory_bytes() > largest
    # a full batch of each model goes through without the region growing
    with MuseTalkClient(triton.grpc_url) as client:
        client.audio_encoder(np.zeros((8, *specs.AUDIO_ENCODER.inputs[0].shape), np.float32))
        client.vae_encoder(np.zeros((16, *specs.VAE_ENCODER.inputs[0].shape), np.uint8))
    assert [r.stat().st_size for r in regions] == [shared_memory_bytes()] * len(regions)


def test_a_server_that_dies_is_started_again_on_its_ports_saying_why(triton, caplog):
    server = LocalTriton(triton.repository, Ports.free(), log_file=BUILD / "triton-supervised.log").start()
    supervisor = Supervisor(server).start()
    try:
        first = server.process.pid
        with caplog.at_level(logging.WARNING, logger="triton_local.supervisor"):
            os.kill(first, signal.SIGKILL)  # what an abort looks like from outside
            assert wait_for(lambda: supervisor.restarts == 1, 10, 0.05)
            assert supervisor.wait_serving(120), "not serving again"
        assert server.process.pid != first and server.ready()
        crash = supervisor.crashes[0]
        assert crash.status == "killed by SIGKILL"
        assert "Started GRPCInferenceService" in crash.log_tail  # the dead server's last lines
        said = "\n".join(r.getMessage() for r in caplog.records)
        assert "killed by SIGKILL; restarting it" in said and "Started GRPCInferenceService" in said
        assert "serves again" in said
        log = server.log_file.read_text()
        assert log.count("Started GRPCInferenceService") == 2  # the restart appended: the crash's lines stay
        assert "restarted by triton_local.supervisor after it killed by SIGKILL" in log
        with MuseTalkClient(server.grpc_url) as client:  # same ports
            audio, latents = frames(2)
            assert client.musetalk(audio, latents).shape == (2, 256, 256, 3)
    finally:
        supervisor.stop()
    assert server.process is None and not listening(server.ports.grpc)


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


INNER_CONFTEST = """
import pytest
from pathlib import Path
from shared_server import supervised
from triton_local.server import LocalTriton, Ports

@pytest.fixture(scope="session")
def triton():
    server = LocalTriton(Path({repository!r}), Ports.free(), log_file=Path({log!r})).start(300)
    with supervised(server):
        yield server
"""
INNER_TESTS = """
import os, signal

def test_during_which_it_dies(triton):
    process = triton.process
    os.kill(process.pid, signal.SIGKILL)
    process.wait(30)

def test_after_it(triton):
    assert triton.ready()

def test_that_needs_no_server():
    pass
"""


def test_a_shared_server_that_dies_fails_the_test_it_died_in_and_serves_the_rest(triton, pytester, monkeypatch):
    """The tests' own plugin (tests/shared_server.py), run by pytest on a session of three tests."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), str(ROOT / "tests")]))
    pytester.makeconftest(INNER_CONFTEST.format(repository=str(triton.repository),
                                                log=str(BUILD / "triton-shared-inner.log")))
    pytester.makepyfile(test_inner=INNER_TESTS)
    result = pytester.runpytest_subprocess("-p", "shared_server", "-q", timeout=300)
    result.assert_outcomes(passed=2, failed=1)
    result.stdout.fnmatch_lines(["*the shared tritonserver killed by SIGKILL during this test*",
                                 "*Started GRPCInferenceService*", "*FAILED test_inner.py::test_during_which_it_dies*"])


def test_restricted_apis_need_the_header_and_inference_does_not(triton):
    """How deploy/ runs Triton: loading models, shared memory, tracing and logging behind a header
    key (and the server on loopback here); what the front end uses stays open to it."""
    header = ("musetalk-admin-key", "the-admin-key-0123456789")
    server = LocalTriton(triton.repository, Ports.free(), log_file=BUILD / "triton-restricted.log",
                         admin_header=header).start()
    try:
        index = f"http://{server.http_url}/v2/repository/index"
        refused = urllib_post(index, {})
        assert refused[0] == 403 and "restricted" in refused[1].lower()
        assert urllib_post(index, {header[0]: header[1]})[0] == 200
        assert urllib_post(f"http://{server.http_url}/v2/systemsharedmemory/status", {})[0] == 403
        with MuseTalkClient(server.grpc_url) as client:  # inference, health, config: open
            audio, latents = frames(1)
            assert client.musetalk(audio, latents).shape == (1, 256, 256, 3)
            assert client.model_config("unet")["name"] == "unet"
            with pytest.raises(Exception, match="(?i)restricted|permission|unavailable|denied"):
                client._worker().client.get_system_shared_memory_status()  # gRPC, without the key
        listening = {c.laddr for c in psutil.Process(server.process.pid).net_connections("inet")
                     if c.status == psutil.CONN_LISTEN}
        assert header[1] not in server.log_file.read_text()
        assert {port for _, port in listening} >= {server.ports.http, server.ports.grpc, server.ports.metrics}
        assert all(loopback(ip) for ip, _ in listening), listening  # loopback only (gRPC's is '::ffff:127.0.0.1')
    finally:
        server.stop()


def loopback(ip: str) -> bool:
    import ipaddress

    address = ipaddress.ip_address(ip)
    return (getattr(address, "ipv4_mapped", None) or address).is_loopback


def urllib_post(url: str, headers: dict) -> tuple[int, str]:
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url, data=b"{}", headers={"Content-Type": "application/json", **headers})
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()
