"""Keep a local tritonserver serving: restart it when it dies, and say why it died.

tritonserver can end by itself: an abort in a backend (the python backend has been seen to
abort the whole server under load), the kernel's OOM killer, a kill. A stack that stops with
it (`make serve`, `make demo`, `make talk`, the tests' shared server) loses everything that was
running; one that starts it again on the same ports loses only the requests in flight: the
front end sees Triton go and come back (its readiness, and `musetalk_triton_ready`), its
sessions stay on screen and speak again at their next segment.

    server = LocalTriton(repository, ports).start()
    supervisor = Supervisor(server).start()      # from now on, a crash is a restart
    ...
    supervisor.stop()                            # stops supervising, then the server

Each crash is logged (ERROR, logger `triton_local.supervisor`) with its exit status and the
last lines of the server's log, which the restart appends to rather than replaces. Restarts
pause 1 s, then twice as long after each crash that follows a restart by less than STABLE_S,
up to 30 s; after GIVE_UP_AFTER starts in a row that fail, it stops trying and says why.
"""
from __future__ import annotations

import logging
import signal
import threading
import time
from dataclasses import dataclass

from triton_local.server import LocalTriton, ServerError

log = logging.getLogger(__name__)

FIRST_PAUSE_S = 1.0
LONGEST_PAUSE_S = 30.0
STABLE_S = 60.0  # a server that served this long before it died starts again after the first pause
GIVE_UP_AFTER = 5  # starts in a row that fail


@dataclass(frozen=True)
class Crash:
    at: float  # time.time() when it was seen
    status: str  # "killed by SIGABRT", "exited with code 1"
    log_tail: str  # the last lines of the server's log


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code}"


class Supervisor:
    """Restarts `server` whenever it exits without being asked to."""

    def __init__(self, server: LocalTriton, start_timeout_s: float = 600.0):
        self.server, self.start_timeout_s = server, start_timeout_s
        self.crashes: list[Crash] = []
        self.gave_up: str | None = None  # why it stopped trying, if it did
        self.serving = threading.Event()  # set while the server is up (cleared from a crash to its restart)
        self._stopping = threading.Event()
        # The thread that restarts the server is its parent thread (triton_local.server.start_child):
        # it lives as long as the supervision, so a restarted server dies with it.
        self._thread = threading.Thread(target=self._watch, name="triton-supervisor", daemon=True)

    @property
    def restarts(self) -> int:
        return len(self.crashes)

    def start(self) -> Supervisor:
        if self.server.process is None:
            raise ServerError("start the server before supervising it")
        self.serving.set()
        self._thread.start()
        return self

    def wait_serving(self, timeout: float) -> bool:
        """Wait until the server is up (at once, unless it is being restarted)."""
        return self.serving.wait(timeout)

    def stop(self) -> None:
        """Stop supervising, and stop the server."""
        self._stopping.set()
        self.server.stop()  # which ends the supervising thread's wait
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(self.start_timeout_s)
        self.server.stop()  # one that a restart under way started meanwhile

    # -- the supervising thread ------------------------------------------------------------
    def _watch(self) -> None:
        pause, failures = FIRST_PAUSE_S, 0
        while not self._stopping.is_set():
            process = self.server.process
            if process is None:
                return
            started = time.monotonic()
            code = process.wait()
            if self._stopping.is_set():
                return
            self.serving.clear()
            crash = Crash(time.time(), describe_exit(code), self.server.log_tail(20))
            self.crashes.append(crash)
            pause = FIRST_PAUSE_S if time.monotonic() - started >= STABLE_S else pause
            log.error("tritonserver (%s) %s; restarting it in %.0f s (restart %d). The last lines of its log, %s:\n%s",
                      self.server.grpc_url, crash.status, pause, self.restarts, self.server.log_file, crash.log_tail)
            while not self._stopping.wait(pause):
                try:
                    self._restart()
                    failures = 0
                    break
                except ServerError as error:
                    failures += 1
                    pause = min(LONGEST_PAUSE_S, pause * 2)
                    if failures >= GIVE_UP_AFTER:
                        self.gave_up = f"tritonserver did not start {failures} times in a row: {error}"
                        log.error("giving up: %s", self.gave_up)
                        return
                    log.error("tritonserver did not start again (trying again in %.0f s): %s", pause, error)
            pause = min(LONGEST_PAUSE_S, pause * 2)

    def _restart(self) -> None:
        self.server.stop()  # what is left of the one that died (its stubs exit with it anyway)
        with self.server.log_file.open("a") as file:
            file.write(f"\n---- {time.strftime('%Y-%m-%d %H:%M:%S')}: restarted by triton_local.supervisor after "
                       f"it {self.crashes[-1].status} ----\n")
        started = time.monotonic()
        self.server.start(self.start_timeout_s, append_log=True)
        if self._stopping.is_set():
            return  # stop() stops it
        self.serving.set()
        log.warning("tritonserver (%s) serves again, %.1f s after restart %d", self.server.grpc_url,
                    time.monotonic() - started, self.restarts)
