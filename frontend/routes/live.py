"""WebSocket /ws/live: speech in as it is spoken, video out as it is made.

A /ws/live connection is a session (frontend/sessions/session.py), unpaced: each frame leaves as
soon as it is made, and its only output is a fragmented MP4 written to this socket
(frontend/sessions/outputs.py). One engine, one inbox, one back-pressure rule and one family of
errors for every live path.

    query: avatar_id (default: the configured one), fps (1..60, 25), sample_rate (8000..96000, 16000)
    client -> server: binary messages of PCM 16-bit little-endian mono samples, any size;
                      then the text message {"type": "end"}
    server -> client: {"type": "start", "codecs": ..., "width", "height", "fps", ...} first;
                      binary messages that together are a fragmented MP4 (init segment first);
                      {"type": "progress", "frames", "audio_seconds", "lag_seconds", "latency_ms"}
                      about twice a second; {"type": "done", "frames": floor(seconds x fps), ...} last.
    errors:           {"type": "error", "error": ..., "status": ...} and close code 4000 + status.
    limits:           MUSETALK_MAX_LIVE_SECONDS of speech (4413), messages up to 1 MiB (4413), nothing
                      received, or no video taken, for MUSETALK_LIVE_IDLE_SECONDS (4408; a client that
                      reads nothing would otherwise hold its slot for ever); while the video trails the
                      speech by MUSETALK_MAX_LIVE_LAG_SECONDS, the speech waits in the client's socket.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import uuid

from fastapi import APIRouter, WebSocket, WebSocketDisconnect

from contract import logs
from frontend import metrics
from frontend.access import Caller
from frontend.errors import refuse_websocket
from frontend.exceptions import ClientGone, Draining, LiveIdle
from frontend.routes.speech_socket import int_parameter, read_speech
from frontend.services import Services
from frontend.sessions.outputs import Fmp4Out
from frontend.sessions.session import Session

router = APIRouter(tags=["live"])
log = logging.getLogger(__name__)
OUTBOX = 8  # messages (fragments of frames) waiting for a slow client before the session waits


@router.websocket("/ws/live")
async def live(websocket: WebSocket, avatar_id: str | None = None, fps: str = "25", sample_rate: str = "16000"):
    s: Services = websocket.app.state.services
    await websocket.accept()
    try:
        caller = s.access.key_holder(websocket.headers, websocket.query_params)
        logs.bind(tenant=caller.name)
        fps = int_parameter("fps", fps, 1, 60)
        sample_rate = int_parameter("sample_rate", sample_rate, 8000, 96000, " Hz")
        avatar = s.avatar(avatar_id, caller)
        if s.sessions.draining:
            raise Draining("this replica is shutting down; connect again (another replica takes it)")
        s.live_slots.take(caller.tenant)
    except Exception as error:  # noqa: BLE001 - every refusal is an error message and a close code
        await refuse_websocket(websocket, error)
        return
    metrics.LIVE_SESSIONS.inc()
    try:
        ending = await _serve(websocket, s, caller, avatar, fps, sample_rate)
    finally:
        metrics.LIVE_SESSIONS.dec()
        s.live_slots.release(caller.tenant)
    # The slot is free before the client hears the end: a client that reconnects at once finds it.
    if isinstance(ending, BaseException):
        await refuse_websocket(websocket, ending)
    elif ending == "done":
        try:
            await websocket.close()
        except Exception:  # noqa: BLE001 - the client may have left after "done"
            pass


async def _serve(websocket: WebSocket, s: Services, caller: Caller, avatar, fps: int, sample_rate: int):
    """Run one session to its end, everything it holds released (its Triton calls cancelled,
    its encoders closed). Returns "done", "gone" (the client left) or the error to tell."""
    loop = asyncio.get_running_loop()
    outbox: asyncio.Queue = asyncio.Queue(OUTBOX)
    closed = threading.Event()
    stalled_after = s.settings.live_idle_seconds

    def send(item: bytes | dict) -> None:  # from the session's thread, in order, waiting for a slow client
        future = asyncio.run_coroutine_threadsafe(outbox.put(item), loop)
        waited = 0.0
        while True:
            try:
                return future.result(timeout=0.5)
            except concurrent.futures.TimeoutError:
                waited += 0.5
                if closed.is_set():
                    future.cancel()
                    raise ClientGone() from None
                if waited >= stalled_after:  # a client that reads nothing would hold its slot forever
                    future.cancel()
                    raise LiveIdle(f"the client has taken no video for {stalled_after:g} s") from None

    session = Session(f"live-{uuid.uuid4().hex[:12]}", avatar, s.client, s.live_options(fps),
                      s.sessions.idle_cycles, live_first=s.live_first, tenant=caller.tenant)
    output = Fmp4Out(avatar, fps, send, s.settings.x264_preset)
    session.add_output(output)
    ended: asyncio.Future = loop.create_future()

    def notify(event: dict, at: float) -> None:  # on the session's thread: an error, or its end
        if event["type"] in ("error", "session_ended"):
            loop.call_soon_threadsafe(lambda: ended.done() or ended.set_result(event))

    session.listen(notify)
    width, height = avatar.size
    await websocket.send_json({"type": "start", "avatar_id": avatar.name, "fps": fps, "width": width,
                               "height": height, "codecs": output.codecs,
                               "synthetic_weights": s.synthetic_weights()})
    session.start()
    sender = asyncio.create_task(_send_all(websocket, outbox))
    receiver = asyncio.create_task(_receive_all(websocket, session, sample_rate, s.settings))
    try:
        # Whichever ends first: the session (its last message queued, or an error), the client's
        # side (an error, a disconnect), or the sending (a client gone while frames were made).
        done, _ = await asyncio.wait({ended, receiver, sender}, return_when=asyncio.FIRST_COMPLETED)
        for task in (receiver, sender):
            if task in done and task.exception() is not None:
                raise task.exception()
        if (await ended)["type"] == "error":
            raise session.failure or RuntimeError(session.error)
        await outbox.put(None)
        await sender
        return "done"
    except (WebSocketDisconnect, ClientGone):
        log.info("live session for %r: the client left after %d frames", avatar.name, output.sent)
        return "gone"
    except Exception as error:  # noqa: BLE001 - the client hears why, the server serves on
        log.warning("live session for %r ended after %d frames: %s", avatar.name, output.sent, error)
        return error
    finally:
        closed.set()
        session.close()
        for task in (receiver, sender):
            task.cancel()
        await asyncio.to_thread(session.closed.wait, 30)  # its Triton calls cancelled, encoders closed


async def _receive_all(websocket: WebSocket, session: Session, rate: int, settings) -> None:
    """The client's audio into the session, never more than it can hold: while the video trails
    the speech it was sent by more than MUSETALK_MAX_LIVE_LAG_SECONDS (its inbox included), the
    speech waits in the client's socket (TCP pushes back): the sessions' one rule."""
    def end() -> bool:
        session.segment_end()
        return True

    def feed(pcm16: bytes) -> None:
        session.speak(pcm16, rate)
        metrics.LIVE_AUDIO_SECONDS.inc(len(pcm16) / 2 / rate)

    await read_speech(websocket, feed, {"end": end}, idle_s=settings.live_idle_seconds,
                      hold=lambda: session.backlog_seconds > settings.max_live_lag_seconds)


async def _send_all(websocket: WebSocket, outbox: asyncio.Queue) -> None:
    while (item := await outbox.get()) is not None:
        if isinstance(item, bytes):
            if item:
                await websocket.send_bytes(item)
        else:
            await websocket.send_json(item)
