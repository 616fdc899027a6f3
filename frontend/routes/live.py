"""WebSocket /ws/live: speech in as it is spoken, video out as it is made.

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
                      reads nothing would otherwise hold its slot for ever).
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading

from fastapi import APIRouter, WebSocket, WebSocketDisconnect

from contract import logs
from frontend import metrics
from frontend.errors import refuse_websocket
from frontend.exceptions import Draining, LiveIdle
from frontend.generation.live import LiveOptions, LiveSession
from frontend.routes.speech_socket import int_parameter, read_speech
from frontend.services import Services

router = APIRouter(tags=["live"])
log = logging.getLogger(__name__)
OUTBOX = 8  # messages (batches of frames: about 2 s of video) waiting for a slow client before the session waits
INBOX_SECONDS = 2.0  # audio received and not yet taken by the session, before the client's socket waits


class ClientGone(RuntimeError):
    pass


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
        ending = await _serve(websocket, s, avatar, fps, sample_rate)
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


async def _serve(websocket: WebSocket, s: Services, avatar, fps: int, sample_rate: int):
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

    options = LiveOptions(batch_size=s.settings.session_batch_size, in_flight=s.settings.in_flight,
                          preset=s.settings.x264_preset, max_seconds=s.settings.max_live_seconds,
                          max_lag_s=s.settings.max_live_lag_seconds)
    session = LiveSession(avatar, fps, sample_rate, s.client, send, options, s.live_first)
    width, height = avatar.size
    await websocket.send_json({"type": "start", "avatar_id": avatar.name, "fps": fps, "width": width,
                               "height": height, "codecs": session.codecs,
                               "synthetic_weights": s.synthetic_weights()})
    worker = _in_thread(loop, session.run)
    sender = asyncio.create_task(_send_all(websocket, outbox))
    receiver = asyncio.create_task(_receive_all(websocket, session, sample_rate, options,
                                                s.settings.live_idle_seconds))
    try:
        # Whichever ends first: the session (its last frame queued), the client's side (an error,
        # a disconnect), or the sending (a client gone while the session was still making frames).
        done, _ = await asyncio.wait({worker, receiver, sender}, return_when=asyncio.FIRST_COMPLETED)
        for task in (receiver, sender):
            if task in done and task.exception() is not None:
                raise task.exception()
        await worker  # the session ends after its last frame (or raises)
        await outbox.put(None)
        await sender
        return "done"
    except (WebSocketDisconnect, ClientGone):
        log.info("live session for %r: the client left after %d frames", avatar.id, session.sent)
        return "gone"
    except Exception as error:  # noqa: BLE001 - the client hears why, the server serves on
        metrics.triton_error(error)
        log.warning("live session for %r failed after %d frames: %s", avatar.id, session.sent, error)
        return error
    finally:
        closed.set()
        session.cancel()
        for task in (receiver, sender, worker):
            task.cancel()
        await asyncio.to_thread(session.finished.wait, 30)  # its Triton calls cancelled, encoders closed


async def _receive_all(websocket: WebSocket, session: LiveSession, rate: int, options: LiveOptions,
                       idle_s: float) -> None:
    """The client's audio into the session, never more than the session can hold: while the
    video trails the audio by more than `max_lag_s`, or the session has not yet taken
    INBOX_SECONDS of what arrived (its thread waits for a client that does not read), the
    audio waits in the client's socket (TCP pushes back)."""
    def end() -> bool:
        session.end()
        return True

    def feed(pcm16: bytes) -> None:
        session.feed(pcm16)
        metrics.LIVE_AUDIO_SECONDS.inc(len(pcm16) / 2 / rate)

    await read_speech(websocket, feed, {"end": end},
                      hold=lambda: session.lag_s > options.max_lag_s or session.inbox_seconds > INBOX_SECONDS,
                      idle_s=idle_s, max_bytes=int(options.max_seconds * rate * 2),
                      too_long=f"a live session takes at most {options.max_seconds:g} s of speech")


async def _send_all(websocket: WebSocket, outbox: asyncio.Queue) -> None:
    while (item := await outbox.get()) is not None:
        if isinstance(item, bytes):
            if item:
                await websocket.send_bytes(item)
        else:
            await websocket.send_json(item)


def _in_thread(loop: asyncio.AbstractEventLoop, work) -> asyncio.Future:
    """Run `work` on a thread of its own (sessions are long: not the shared thread pool)."""
    future = loop.create_future()

    def settle(error: BaseException | None, result=None) -> None:
        if not future.done():
            future.set_exception(error) if error else future.set_result(result)

    def target():
        try:
            result = work()
        except BaseException as error:  # noqa: BLE001 - handed to the awaiting coroutine
            loop.call_soon_threadsafe(settle, error)
        else:
            loop.call_soon_threadsafe(settle, None, result)

    threading.Thread(target=target, name="live-session", daemon=True).start()
    return future
