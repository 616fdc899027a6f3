"""A session published to a media server that fans it out: over WHIP (RFC 9725) to an SFU (Janus,
LiveKit, SRS, ...) whose rooms its viewers join, or over RTMP to a streaming ingest (nginx-rtmp, a
CDN, a live-commerce platform). The replica sends the session once per destination, however many
watch it there.

WHIP: the session's own packets, as to a WHEP viewer (frontend/sessions/viewers.py: the same
tracks, the same clock, no second encode); only the offer goes the other way (we offer, the
endpoint answers). RTMP: FLV with H.264 and AAC (frontend/video/rtmp.py), encoded once per
destination on a thread of its own from the session's pictures and sound, idle and speech alike.

A destination that goes away is tried again with backoff (0.5 s, doubling, at most 10 s), its
state reported (`publish_state` events to the speech socket, the session's status, metrics); it
never holds the session or its other viewers back: WHIP drops a stalled sender's oldest packets
like any viewer's, RTMP's thread takes frames from a short queue that drops its oldest.

Where a session may publish is the operator's choice (MUSETALK_PUBLISH_TO: URL prefixes): the
replica connects wherever it is told to, so by default it is told nowhere.
"""
from __future__ import annotations

import asyncio
import logging
import posixpath
import queue
import threading
import time
import uuid
from collections.abc import Callable
from urllib.parse import urljoin, urlsplit

import httpx
import numpy as np
from aiortc import RTCPeerConnection, RTCRtpSender, RTCSessionDescription

from frontend import metrics
from frontend.exceptions import PublishRefused
from frontend.sessions.viewers import Viewer, ice_configuration
from frontend.video.rtc import AUDIO_RATE
from frontend.video.rtmp import RtmpWriter

log = logging.getLogger(__name__)

RETRY_FIRST_S, RETRY_MAX_S = 0.5, 10.0
CONNECT_S = 10.0  # a WHIP endpoint's answer and the connection after it, or it is tried again
SILENT_S = 5.0  # no RTCP from the media server for this long: it is gone (ICE would take 30 s to say)
RTMP_QUEUE_S = 1.0  # frames waiting for RTMP's thread before the oldest are dropped
SCHEMES = {"whip": ("http", "https"), "rtmp": ("rtmp", "rtmps")}
DEFAULT_PORTS = {"http": 80, "https": 443, "rtmp": 1935, "rtmps": 443}


def shown(url: str) -> str:
    """`url` as status and logs show it: no credentials, no query, and an RTMP URL's last path
    part (its stream key, a secret) hidden."""
    parts = urlsplit(url)
    path = parts.path
    if parts.scheme in SCHEMES["rtmp"] and path.count("/") >= 2:
        path = path.rsplit("/", 1)[0] + "/…"
    return f"{parts.scheme}://{parts.hostname or ''}{f':{parts.port}' if parts.port else ''}{path}"


def _place(url: str) -> tuple[str, str, int, str]:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    path = posixpath.normpath(parts.path or "/") + ("/" if parts.path.endswith("/") else "")
    return scheme, (parts.hostname or "").lower(), parts.port or DEFAULT_PORTS.get(scheme, 0), path


def check_destination(kind: str, url: str, allowed: list[str]) -> None:
    """PublishRefused unless `url` is a `kind` URL under one of the `allowed` prefixes (scheme, host
    and port equal, path within the prefix's)."""
    if not allowed:
        raise PublishRefused("publishing is off on this server: its operator lists where sessions may be "
                             "published in MUSETALK_PUBLISH_TO")
    parts = urlsplit(url)
    if parts.scheme.lower() not in SCHEMES[kind] or not parts.hostname:
        raise PublishRefused(f"a {kind} destination is a {' or '.join(SCHEMES[kind])} URL, not {shown(url)!r}")
    if parts.username or parts.password:
        raise PublishRefused("a destination URL carries no credentials (a WHIP endpoint's go in \"token\")")
    scheme, host, port, path = _place(url)
    for prefix in allowed:
        p_scheme, p_host, p_port, p_path = _place(prefix)
        if (scheme, host, port) == (p_scheme, p_host, p_port) and path.startswith(p_path):
            return
    raise PublishRefused(f"{shown(url)} is not a destination this server publishes to (MUSETALK_PUBLISH_TO)")


class Backoff:
    def __init__(self, first: float = RETRY_FIRST_S, most: float = RETRY_MAX_S):
        self.first, self.most, self.delay = first, most, first

    def next(self) -> float:
        delay, self.delay = self.delay, min(self.most, self.delay * 2)
        return delay

    def reset(self) -> None:
        self.delay = self.first


class Publication:
    """One destination of a session; its state is "connecting", "live", "retrying" or "stopped"."""

    kind = ""

    def __init__(self, session, url: str):
        self.id = uuid.uuid4().hex[:12]
        self.session, self.url = session, url
        self.state, self.error = "connecting", None
        self.attempts, self.connections = 0, 0  # tries, and those that went live
        self.since = time.time()

    def status(self) -> dict:
        return {"id": self.id, "kind": self.kind, "target": shown(self.url), "state": self.state,
                "error": self.error, "attempts": self.attempts, "connections": self.connections,
                "since": round(self.since, 3)}

    def frame(self, picture: Callable[[], np.ndarray], audio: np.ndarray) -> None:
        """Every tick of the session (on its thread): what a destination that encodes needs."""

    def _state(self, state: str, error: str | None = None) -> None:
        if (state, error) == (self.state, self.error):
            return
        if state == "live":
            self.connections += 1
            metrics.PUBLICATIONS_LIVE.labels(self.kind).inc()
        elif self.state == "live":
            metrics.PUBLICATIONS_LIVE.labels(self.kind).dec()
        self.state, self.error, self.since = state, error, time.time()
        metrics.PUBLISH_STATES.labels(self.kind, state).inc()
        (log.warning if state == "retrying" else log.info)(
            "session %s publication %s (%s %s): %s%s", self.session.id, self.id, self.kind, shown(self.url),
            state, f": {error}" if error else "")
        self.session.publish_state(self.status())


class WhipPublication(Publication):
    """The session as a WebRTC publisher: a viewer of its packets whose offer we make and POST."""

    kind = "whip"

    def __init__(self, session, url: str, token: str | None):
        super().__init__(session, url)
        self.token = token
        self.viewer: Viewer | None = None
        self.resource: str | None = None
        self.http: httpx.AsyncClient | None = None
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        """On the event loop."""
        self.http = httpx.AsyncClient(timeout=CONNECT_S)
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        backoff = Backoff()
        while True:
            self.attempts += 1
            self._state("connecting")
            try:
                lost = await self._connect()
                self._state("live")
                backoff.reset()
                error = await lost
            except asyncio.CancelledError:
                raise
            except Exception as failure:  # noqa: BLE001 - every failure is tried again
                error = str(failure) or type(failure).__name__
            await self._disconnect()
            delay = backoff.next()
            self._state("retrying", f"{error}; trying again in {delay:g} s")
            await asyncio.sleep(delay)

    async def _connect(self) -> asyncio.Future:
        """Offer, POST, answer, connected: a future of why the connection ends."""
        loop = asyncio.get_running_loop()
        viewer = self.viewer = Viewer(self.session, "H264", self.session.fps, loop)
        pc = viewer.pc = RTCPeerConnection(ice_configuration(self.session.ice_servers))
        video = pc.addTransceiver(viewer.video, direction="sendonly")
        video.setCodecPreferences([c for c in RTCRtpSender.getCapabilities("video").codecs
                                   if c.mimeType.lower() in ("video/h264", "video/rtx")])
        audio = pc.addTransceiver(viewer.audio, direction="sendonly")
        audio.setCodecPreferences([c for c in RTCRtpSender.getCapabilities("audio").codecs
                                   if c.mimeType.lower() == "audio/opus"])
        await pc.setLocalDescription(await pc.createOffer())  # every candidate gathered: non-trickle
        headers = {"Content-Type": "application/sdp", **self._credential()}
        response = await self.http.post(self.url, content=pc.localDescription.sdp, headers=headers)
        if response.status_code != 201:
            raise ConnectionError(f"the WHIP endpoint answered {response.status_code}: {response.text[:200]}")
        location = response.headers.get("location")
        self.resource = urljoin(self.url, location) if location else None
        await pc.setRemoteDescription(RTCSessionDescription(response.text, "answer"))
        # A picture-loss report (a subscriber joined the room) asks the session for a keyframe,
        # as a WHEP viewer's does; each RTCP packet says the media server is still there.
        video.sender._send_keyframe = lambda: self.session.picture_lost("H264")
        heard = [time.monotonic()]
        handle = video.sender._handle_rtcp_packet

        async def noted(packet) -> None:
            heard[0] = time.monotonic()
            await handle(packet)

        video.sender._handle_rtcp_packet = noted
        connected, lost = loop.create_future(), loop.create_future()

        @pc.on("connectionstatechange")
        async def changed() -> None:
            if pc.connectionState == "connected" and not connected.done():
                connected.set_result(True)
            if pc.connectionState in ("failed", "closed"):
                for future in (connected, lost):
                    if not future.done():
                        future.set_result(f"the WebRTC connection {pc.connectionState}")

        async def cannot_keep_up(_viewer) -> None:
            if not lost.done():
                lost.set_result("the media server did not take the packets")

        viewer.on_gone = cannot_keep_up
        try:
            if await asyncio.wait_for(connected, CONNECT_S) is not True:
                raise ConnectionError(connected.result())
        except TimeoutError:
            raise ConnectionError(f"no WebRTC connection within {CONNECT_S:g} s of the answer") from None
        self.session.add_viewer(viewer.id, viewer, counted=False)

        async def silence() -> None:
            while not lost.done():
                await asyncio.sleep(1.0)
                if time.monotonic() - heard[0] > SILENT_S and not lost.done():
                    lost.set_result(f"the media server sent nothing for {SILENT_S:g} s")

        watching = loop.create_task(silence())
        lost.add_done_callback(lambda _: watching.cancel())
        return lost

    async def _disconnect(self) -> None:
        viewer, resource, self.viewer, self.resource = self.viewer, self.resource, None, None
        if viewer is not None:
            self.session.remove_viewer(viewer.id)
            await viewer.close()
        if resource is not None:  # the endpoint frees its publisher slot
            try:
                await self.http.delete(resource, headers=self._credential(), timeout=3)
            except httpx.HTTPError:
                pass  # gone with its server

    def _credential(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def end(self) -> None:
        """From any thread: stop trying (stop() finishes the job on the event loop)."""
        if self._task is not None:
            self._task.get_loop().call_soon_threadsafe(self._task.cancel)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self._disconnect()
        if self.http is not None:
            await self.http.aclose()
        self._state("stopped")


class RtmpPublication(Publication):
    """The session as an RTMP stream: its pictures and sound encoded on a thread of its own."""

    kind = "rtmp"

    def __init__(self, session, url: str, video_kbps: int, keyframe_seconds: float, preset: str):
        super().__init__(session, url)
        self.video_kbps, self.keyframe_seconds, self.preset = video_kbps, keyframe_seconds, preset
        self.frames: queue.Queue = queue.Queue(max(1, round(RTMP_QUEUE_S * session.fps)))
        self.dropped = 0
        self._stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name=f"rtmp-{self.id}", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def status(self) -> dict:
        return {**super().status(), "frames_dropped": self.dropped}

    def frame(self, picture: Callable[[], np.ndarray], audio: np.ndarray) -> None:
        if self.state == "retrying":
            return  # nobody to send it to: not even composed
        while True:
            try:
                self.frames.put_nowait((picture(), audio))
                return
            except queue.Full:
                try:
                    self.frames.get_nowait()  # the stream is behind: its oldest frame goes
                    self.dropped += 1
                except queue.Empty:
                    pass

    def _run(self) -> None:
        backoff = Backoff()
        width, height = self.session.avatar.size
        while not self._stopping.is_set():
            self.attempts += 1
            self._state("connecting")
            writer = None
            try:
                while not self.frames.empty():
                    self.frames.get_nowait()  # frames from before this connection are late
                writer = RtmpWriter(self.url, width, height, self.session.fps, AUDIO_RATE, self.video_kbps,
                                    self.keyframe_seconds, self.preset)
                while not self._stopping.is_set():
                    try:
                        picture, audio = self.frames.get(timeout=0.5)
                    except queue.Empty:
                        continue
                    writer.write(picture, audio)
                    if self.state != "live":
                        self._state("live")
                        backoff.reset()
                error = None
            except Exception as failure:  # noqa: BLE001 - every failure is tried again
                error = str(failure) or type(failure).__name__
            finally:
                if writer is not None:
                    writer.close()
            if error is None or self._stopping.is_set():
                break
            delay = backoff.next()
            self._state("retrying", f"{error}; trying again in {delay:g} s")
            self._stopping.wait(delay)
        self._state("stopped")

    def end(self) -> None:
        self._stopping.set()

    async def stop(self) -> None:
        self.end()
        await asyncio.to_thread(self.thread.join, 10)
