"""A pytest plugin: the shared tritonserver is supervised, and a test during which it died fails.

The session's tests share one local tritonserver (conftest.py's `triton`). If it dies (the
python backend has been seen to abort under load), every later test that needs it would fail
with "connection refused", and the cause would be lost among them. Instead, its supervisor
starts it again on the same ports; the test that was running when it died fails, saying how
it died and with the last lines of its log; the tests after it wait until it serves again.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from triton_local.server import LocalTriton
from triton_local.supervisor import Supervisor

RESTART_WAIT_S = 300.0
_supervisors: list[Supervisor] = []  # the shared server's, while it runs
_CRASHES_BEFORE = pytest.StashKey[int]()


@contextmanager
def supervised(server: LocalTriton) -> Iterator[Supervisor]:
    """Supervise the session's shared `server` (started) until the block ends, then stop it."""
    supervisor = Supervisor(server).start()
    _supervisors.append(supervisor)
    try:
        yield supervisor
    finally:
        _supervisors.remove(supervisor)
        supervisor.stop()


def _watching(item) -> Supervisor | None:
    return _supervisors[0] if _supervisors and "triton" in item.fixturenames else None


def pytest_runtest_setup(item) -> None:
    """A test that needs the shared server, while it is being started again, waits for it."""
    supervisor = _watching(item)
    if supervisor is not None and not supervisor.wait_serving(RESTART_WAIT_S):
        pytest.fail(f"the shared tritonserver is not back: {supervisor.gave_up or 'still starting'}")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    supervisor = _watching(item)
    if supervisor is None:
        return
    if call.when == "setup":
        item.stash[_CRASHES_BEFORE] = supervisor.restarts
    elif call.when == "call" and supervisor.restarts > item.stash.get(_CRASHES_BEFORE, supervisor.restarts):
        crash = supervisor.crashes[-1]
        report.outcome = "failed"
        report.longrepr = (f"the shared tritonserver {crash.status} during this test; it is started again for the "
                           f"tests after it. The last lines of its log ({supervisor.server.log_file}):\n"
                           f"{crash.log_tail}")
