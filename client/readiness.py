"""Waiting for something to become true: a server ready, a model loaded, a process up.

One loop for everything in the project that waits (the SDK's wait_until_ready,
the local server's start, the launchers), so that timeouts, polling intervals
and giving up early all behave the same way.
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

INTERVAL_S = 0.25


def wait_for(condition: Callable[[], bool], timeout_s: float, interval_s: float = INTERVAL_S,
             give_up: Callable[[], bool] = lambda: False) -> bool:
    """Poll `condition` until it is true (True), `timeout_s` passes or `give_up()` says so (False)."""
    deadline = time.monotonic() + timeout_s
    while True:
        if condition():
            return True
        if give_up() or time.monotonic() >= deadline:
            return False
        time.sleep(interval_s)


async def wait_for_async(condition: Callable[[], Awaitable[bool]], timeout_s: float,
                         interval_s: float = INTERVAL_S) -> bool:
    """`wait_for` for coroutines: poll `await condition()` without blocking the event loop."""
    deadline = time.monotonic() + timeout_s
    while True:
        if await condition():
            return True
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(interval_s)
