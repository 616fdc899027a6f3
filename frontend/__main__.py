"""python -m frontend: the service as the image runs it (uvicorn), with a drain on SIGTERM.

    python -m frontend                              # 127.0.0.1:8080, open (no API keys)
    MUSETALK_API_KEYS_FILE=keys python -m frontend --host 0.0.0.0 --port 8080   # settings: frontend/settings.py

Kubernetes stops a pod (a rollout, a scale-in, a node drained) with SIGTERM, then kills it
after terminationGracePeriodSeconds. Plain uvicorn would close every WebSocket at once and
drop the sessions it holds. On the first SIGTERM this front end drains instead:

  1. new sessions and /ws/live are refused (503 + Retry-After), /readyz says draining
     (the pod is leaving its Service anyway; requests for its own sessions still arrive,
     forwarded by the other replicas: frontend/sessions/routing.py);
  2. every session's speech socket hears {"type": "going_away", "seconds_left": N}: a
     client opens a new session (on another replica) and moves its viewers there;
  3. once every session has ended, or MUSETALK_DRAIN_SECONDS have passed, the rest end
     (their speech sockets close with 1001, going away);
  4. uvicorn stops as usual: answers in progress finish (up to --graceful-seconds).

A second SIGTERM, or Ctrl-C, stops at once.
"""
from __future__ import annotations

import argparse
import asyncio
import contextvars
import logging
import signal
import sys

import uvicorn

from contract import logs
from frontend.access import describe, listening_problem
from frontend.app import create_app
from frontend.settings import Settings

WS_MAX_SIZE = 2 << 20  # WebSocket messages above 2 MiB (decompressed) are refused by uvicorn itself (1009)
log = logging.getLogger("frontend")  # (as `python -m frontend`, this module's __name__ is "__main__")


class DrainingServer(uvicorn.Server):
    """uvicorn that drains the service's sessions on the first SIGTERM before it stops."""

    def __init__(self, config: uvicorn.Config, app):
        super().__init__(config)
        self.app = app
        self.drain_task: asyncio.Task | None = None

    def handle_exit(self, sig: int, frame) -> None:
        if sig != signal.SIGTERM or self.drain_task is not None:
            return super().handle_exit(sig, frame)
        loop = asyncio.get_event_loop()  # the signal handler runs on the loop's (main) thread
        # A context of its own: the signal may come in the middle of a request, whose log context
        # (its request id, its tenant) is not the drain's.
        self.drain_task = loop.create_task(self._drain(), context=contextvars.Context())

    async def _drain(self) -> None:
        try:
            await self.app.state.services.drain()
        except Exception:  # noqa: BLE001 - a failed drain must still let the process stop
            log.exception("draining failed; stopping")
        super().handle_exit(signal.SIGTERM, None)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m frontend", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1", help="where to listen (another address than loopback needs "
                   "MUSETALK_API_KEYS_FILE, or MUSETALK_OPEN_NETWORK on a trusted network)")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--graceful-seconds", type=float, default=30.0,
                   help="after the drain, how long answers in progress may take to finish")
    args = p.parse_args(argv)
    log_config = logs.configure()
    settings = Settings()
    problem = listening_problem(args.host, settings.api_keys_file, settings.open_network)
    if problem:
        log.critical("%s", problem)
        return 2
    app = create_app(settings)
    log.info("listening on %s:%d; %s", args.host, args.port, describe(app.state.services.access, args.host))
    config = uvicorn.Config(app, host=args.host, port=args.port, ws_max_size=WS_MAX_SIZE,
                            timeout_graceful_shutdown=args.graceful_seconds, log_config=log_config)
    DrainingServer(config, app).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
