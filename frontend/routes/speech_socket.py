"""Reading speech from a WebSocket: the one inbox reader of /ws/live and of a session's speech socket.

Speech arrives as binary messages of 16-bit little-endian mono PCM, commands as JSON text
({"type": ...}). The reader holds back (the audio waits in the client's socket, and TCP
pushes back) while `hold()` says the consumer has enough, refuses a message over
MAX_MESSAGE or speech over the length limit (413), a command it does not know (422), and
a client silent for `idle_s` (408).
"""
from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

from fastapi import WebSocket, WebSocketDisconnect

from frontend.exceptions import LiveError, LiveIdle, LiveTooLong

MAX_MESSAGE = 1 << 20  # 1 MiB of PCM per message (33 s at 16 kHz): bigger is a mistake or an attack
HOLD_POLL_S = 0.05


def int_parameter(name: str, value: str, low: int, high: int, unit: str = "") -> int:
    """A WebSocket's integer query parameter (refused as a message and a close code, like every
    other bad input, rather than by FastAPI's validation, which can only refuse the handshake)."""
    number = int(value) if value.strip().isdigit() else None
    if number is None or not low <= number <= high:
        raise LiveError(f"{name} must be {low}..{high}{unit}, got {value!r}")
    return number


async def read_speech(websocket: WebSocket, on_pcm: Callable[[bytes], None],
                      commands: dict[str, Callable[[], bool | None]], hold: Callable[[], bool] = lambda: False,
                      idle_s: float | None = None, max_bytes: int | None = None, too_long: str = "") -> None:
    """Hand every PCM message to `on_pcm` and run `commands[type]` for each command, until one
    returns True (then return) or the client leaves (WebSocketDisconnect)."""
    received = 0
    while True:
        while hold():
            await asyncio.sleep(HOLD_POLL_S)
        try:
            message = await asyncio.wait_for(websocket.receive(), idle_s)
        except TimeoutError:
            raise LiveIdle(f"nothing received for {idle_s:g} s") from None
        if message["type"] == "websocket.disconnect":
            raise WebSocketDisconnect(message.get("code", 1000))
        if message.get("bytes") is not None:
            data = message["bytes"]
            if len(data) > MAX_MESSAGE:
                raise LiveTooLong(f"a PCM message is at most {MAX_MESSAGE // 1024} kB; send smaller pieces")
            received += len(data)
            if max_bytes is not None and received > max_bytes:
                raise LiveTooLong(too_long)
            on_pcm(data)
            continue
        text = message.get("text") or ""
        try:
            command = json.loads(text)
        except ValueError:
            command = None
        kind = command.get("type") if isinstance(command, dict) else None
        if kind not in commands:
            expected = " or ".join(f'{{"type": "{name}"}}' for name in commands)
            raise LiveError(f"expected binary PCM or {expected}, got {text[:80]!r}")
        if commands[kind]():
            return
