"""Conversational sessions from Python: open one on the front end, watch it over WebRTC
(WHEP, with aiortc), speak into it. Needs `pip install "musetalk-triton[sessions]"`.

    from client.sessions import AvatarSession

    session = await AvatarSession.open("http://localhost:8080", fps=25, api_key=KEY)  # or MUSETALK_API_KEY
    viewer = await session.watch()                       # WebRTC: frames and audio arrive
    speech = await session.speech(sample_rate=16000)
    await speech.send(pcm16)                             # as fast as your TTS makes it
    await speech.end_segment()
    event = await speech.event()                         # speech_started, speech_finished, ...
    frame = await viewer.video.get()                     # Received(frame=av.VideoFrame, arrived, ...)
    await session.close()

With API keys (the front end's MUSETALK_API_KEYS_FILE), the session is opened with the key; its
viewers connect with the session's viewer token and its speech socket with its speaker token
(what a browser would hold), never with the key.

Every frame that arrives says when its first RTP packet arrived (`arrived`,
time.monotonic) and its RTP timestamp, before any jitter buffer or decoder:
what latency and lip-sync measurements need.

Sessions move. A replica that shuts down (a rollout, a scale-in) says `going_away` first;
a front end that restarts, or a replica that is gone, ends the speech socket or the WebRTC
connection. Then the session opens a new one at the same URL (the Service sends it to a
replica that is up) and moves there: the same Viewer objects go on receiving frames, the
same Speech objects take PCM and give events, and a `session_moved` event says so (what
was queued on the old one is not spoken: a new turn speaks again). `follow=False` turns it off.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections import OrderedDict
from dataclasses import dataclass

import av
import httpx
import websockets
from aiortc import RTCConfiguration, RTCIceServer, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError
from aiortc.rtcconfiguration import RTCIceTransportPolicy

BUFFER_SECONDS = 10.0  # frames kept for a reader that falls behind (the oldest go first)
MOVE_WITHIN_S = 60.0  # how long a move keeps trying to open a new session (503s while replicas start)
GONE_CODES = {1001, 1006, 1011, 1012, 4404, 4503}  # a speech socket closed by these: the session is gone
log = logging.getLogger(__name__)


class SessionError(RuntimeError):
    """The front end refused a session request; the message is its error."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


@dataclass
class Received:
    frame: av.VideoFrame | av.AudioFrame | None  # None: the track ended (the connection closed)
    arrived: float  # time.monotonic() when its first RTP packet arrived
    rtp_timestamp: int  # the sender's RTP timestamp (video 90 kHz, audio 48 kHz)


def _check(response: httpx.Response) -> httpx.Response:
    if response.is_error:
        try:
            message = response.json().get("error", response.text)
        except ValueError:
            message = response.text
        raise SessionError(f"{response.request.method} {response.request.url.path}: {response.status_code} "
                           f"{message}", response.status_code)
    return response


class AvatarSession:
    """A session on the front end at `url` (its JSON description is `info`)."""

    def __init__(self, url: str, info: dict, http: httpx.AsyncClient, request: dict, relay_only: bool = False,
                 follow: bool = True, move_within_s: float = MOVE_WITHIN_S):
        self.url, self.info, self.http = url.rstrip("/"), info, http
        self.id = info["id"]
        self.request, self.relay_only, self.follow = request, relay_only, follow
        self.move_within_s = move_within_s
        self.viewers: list[Viewer] = []
        self.speeches: list[Speech] = []
        self.moves = 0
        self.closed = False
        self._moving: asyncio.Task | None = None

    @classmethod
    async def open(cls, url: str, avatar_id: str | None = None, fps: int = 25, relay_only: bool = False,
                   follow: bool = True, move_within_s: float = MOVE_WITHIN_S, api_key: str | None = None,
                   **options) -> AvatarSession:
        """POST /sessions; `options`: transition_frames, silence_dbfs. `relay_only`: the viewers
        take media through a TURN relay only (what a viewer behind a strict firewall gets).
        `follow`: move to a new session when this one goes away, trying for `move_within_s`.
        `api_key`: the front end's key for this tenant (default: $MUSETALK_API_KEY; none for a
        front end without keys)."""
        key = api_key or os.environ.get("MUSETALK_API_KEY")
        http = httpx.AsyncClient(base_url=url, timeout=30, headers=bearer(key))
        body = {"fps": fps, **({"avatar_id": avatar_id} if avatar_id else {}), **options}
        try:
            info = await _create(http, body)
        except BaseException:
            await http.aclose()
            raise
        return cls(url, info, http, body, relay_only, follow, move_within_s)

    async def status(self) -> dict:
        return _check(await self.http.get(f"/sessions/{self.id}")).json()

    async def watch(self, timeout: float = 30) -> Viewer:
        """A WebRTC viewer, by WHEP: video (H.264) and audio (Opus) start arriving at once."""
        viewer = Viewer(self)
        await asyncio.wait_for(viewer.connect(), timeout)
        self.viewers.append(viewer)
        return viewer

    async def speech(self, sample_rate: int = 16000) -> Speech:
        """The session's speech socket (one at a time per session)."""
        speech = Speech(self, sample_rate)
        await speech.connect()
        self.speeches.append(speech)
        return speech

    def ice_configuration(self) -> RTCConfiguration:
        servers = [RTCIceServer(urls=s["urls"], username=s.get("username"), credential=s.get("credential"))
                   for s in self.info.get("ice_servers", [])]
        policy = RTCIceTransportPolicy.RELAY if self.relay_only else RTCIceTransportPolicy.ALL
        return RTCConfiguration(iceServers=servers, iceTransportPolicy=policy)

    # -- moving -------------------------------------------------------------------------------
    def gone(self, why: str) -> None:
        """The session is going away, or has gone (`why`): move to a new one (once at a time)."""
        if not self.follow or self.closed or (self._moving is not None and not self._moving.done()):
            return
        self._moving = asyncio.ensure_future(self._move(why))

    async def moved(self) -> None:
        """Wait for a move in progress, if any."""
        if self._moving is not None:
            await asyncio.shield(self._moving)

    async def _move(self, why: str) -> None:
        started, old = time.monotonic(), self.id
        deadline = started + self.move_within_s
        while True:
            try:
                info = await _create(self.http, self.request)
                break
            except (SessionError, httpx.HTTPError) as error:
                if time.monotonic() > deadline or self.closed:
                    log.error("MuseTalk session %s is gone (%s) and no new one opened: %s", old, why, error)
                    for speech in self.speeches:
                        speech.note({"type": "error", "error": f"the session is gone and no new one opened: {error}"})
                    for viewer in self.viewers:  # their tracks have ended for good
                        viewer.ended()
                    return
                await asyncio.sleep(_retry_after(error))
        self.info, self.id = info, info["id"]
        for viewer in self.viewers:
            await viewer.reconnect()
        for speech in self.speeches:
            await speech.reconnect()
        self.moves += 1
        seconds = time.monotonic() - started
        log.info("MuseTalk session %s went away (%s): moved to session %s in %.2f s", old, why, self.id, seconds)
        event = {"type": "session_moved", "from": old, "to": self.id, "seconds": round(seconds, 3), "why": why}
        for speech in self.speeches:
            speech.note(event)
        try:
            await self.http.delete(f"/sessions/{old}")  # a draining replica ends it sooner
        except httpx.HTTPError:
            pass

    async def publish(self, whip: str | None = None, token: str | None = None, rtmp: str | None = None) -> dict:
        """Send the session to a media server too: a WHIP endpoint (an SFU's room, with its Bearer
        `token`) or an RTMP ingest. The publication's status: its `id` (for `unpublish`), `state`."""
        body = {"whip": whip, "token": token} if whip is not None else {"rtmp": rtmp}
        return _check(await self.http.post(f"/sessions/{self.id}/publish", json=body)).json()

    async def unpublish(self, publication_id: str) -> None:
        _check(await self.http.delete(f"/sessions/{self.id}/publish/{publication_id}"))

    async def close(self) -> None:
        """End the session (DELETE), and close what this object opened."""
        self.closed = True
        if self._moving is not None:
            self._moving.cancel()
        for speech in self.speeches:
            await speech.close()
        for viewer in self.viewers:
            await viewer.close(delete=False)
        try:
            response = await self.http.delete(f"/sessions/{self.id}")
            if response.status_code != 404:
                _check(response)
        finally:
            await self.http.aclose()

    async def __aenter__(self) -> AvatarSession:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()


async def _create(http: httpx.AsyncClient, body: dict) -> dict:
    return _check(await http.post("/sessions", json=body)).json()


def bearer(credential: str | None) -> dict[str, str]:
    """The Authorization header of `credential` (none without one)."""
    return {"Authorization": f"Bearer {credential}"} if credential else {}


def _retry_after(error: BaseException) -> float:
    status = getattr(error, "status", None)
    return 1.0 if status in (429, 503) else 2.0


class Viewer:
    """A WHEP viewer: `video` and `audio` are queues of `Received` frames (a frame of None
    when the track has ended for good: the session ended and was not followed)."""

    def __init__(self, session: AvatarSession):
        self.session = session
        self.pc: RTCPeerConnection | None = None
        self.video: asyncio.Queue[Received] = asyncio.Queue()
        self.audio: asyncio.Queue[Received] = asyncio.Queue()
        self.location: str | None = None
        self._tasks: list[asyncio.Task] = []

    async def connect(self) -> None:
        self.pc = pc = RTCPeerConnection(self.session.ice_configuration())
        transceivers = [pc.addTransceiver(kind, direction="recvonly") for kind in ("video", "audio")]
        arrivals = [probe_arrivals(t.receiver) for t in transceivers]
        await pc.setLocalDescription(await pc.createOffer())  # gathers every candidate first
        response = _check(await self.session.http.post(
            self.session.info["whep"], content=pc.localDescription.sdp,
            headers={"Content-Type": "application/sdp", **self._credential()}))
        self.location = response.headers["Location"]
        await pc.setRemoteDescription(RTCSessionDescription(response.text, "answer"))

        @pc.on("connectionstatechange")
        async def changed() -> None:
            if pc.connectionState == "failed" and pc is self.pc:
                self.session.gone("the WebRTC connection failed")

        for transceiver, noted, out in zip(transceivers, arrivals, (self.video, self.audio)):
            self._tasks.append(asyncio.ensure_future(self._read(transceiver.receiver.track, noted, out)))

    def _credential(self) -> dict[str, str]:
        """The session's viewer token, where it has one: a viewer needs no more (nor holds the key)."""
        token = self.session.info.get("viewer_token")
        return bearer(token) if token else {}

    def ended(self) -> None:
        """The viewer's media are over (the session ended and no new one could be opened)."""
        for queue in (self.video, self.audio):
            queue.put_nowait(Received(None, time.monotonic(), 0))

    async def reconnect(self) -> None:
        """Watch the session again (it moved): the same queues go on."""
        old, tasks = self.pc, self._tasks
        self._tasks = []
        for task in tasks:
            task.cancel()  # the old tracks' end is not the viewer's end
        await self.connect()
        await old.close()

    async def _read(self, track, arrivals: _Arrivals, out: asyncio.Queue) -> None:
        try:
            await read_frames(track, arrivals, out)
        except MediaStreamError:
            if self.session.follow and not self.session.closed:
                self.session.gone("its media ended")
                return  # the move reconnects this viewer (or ends it, if no new session opens)
            out.put_nowait(Received(None, time.monotonic(), 0))

    async def close(self, delete: bool = True) -> None:
        if delete and self.location:
            response = await self.session.http.delete(self.location, headers=self._credential())
            if response.status_code != 404:  # the session may have ended already
                _check(response)
        for task in self._tasks:
            task.cancel()
        if self.pc is not None:
            await self.pc.close()


class _Arrivals:
    """When each RTP timestamp's first packet arrived (the latest few thousand)."""

    def __init__(self):
        self.times: OrderedDict[int, float] = OrderedDict()
        self.origin: int | None = None  # the first timestamp: aiortc's frames count from it

    def add(self, timestamp: int) -> None:
        if self.origin is None:
            self.origin = timestamp
        if timestamp not in self.times:
            self.times[timestamp] = time.monotonic()
            if len(self.times) > 4096:
                self.times.popitem(last=False)

    def timestamp(self, pts: int) -> int:
        return ((self.origin or 0) + pts) & 0xFFFFFFFF

    def at(self, timestamp: int) -> float:
        return self.times.get(timestamp, time.monotonic())


async def read_frames(track, arrivals: _Arrivals, out: asyncio.Queue) -> None:
    """Every frame of `track` into `out`, with when its first packet arrived (the oldest dropped
    past BUFFER_SECONDS), until the track ends (MediaStreamError)."""
    while True:
        frame = await track.recv()
        timestamp = arrivals.timestamp(frame.pts)
        if out.qsize() > BUFFER_SECONDS * 50:
            out.get_nowait()
        out.put_nowait(Received(frame, arrivals.at(timestamp), timestamp))


def probe_arrivals(receiver) -> _Arrivals:
    """Note each RTP packet's arrival as aiortc's transport hands it over, before its jitter
    buffer (which holds audio back 80 ms and video a frame) and its decoder."""
    arrivals = _Arrivals()
    handle = receiver._handle_rtp_packet

    async def noted(packet, arrival_time_ms: int) -> None:
        arrivals.add(packet.timestamp)
        await handle(packet, arrival_time_ms)

    receiver._handle_rtp_packet = noted
    return arrivals


class Speech:
    """The speech socket: PCM in, segment ends, interrupts; events out. After a move it is the
    new session's socket (PCM sent while it moves waits for it)."""

    def __init__(self, session: AvatarSession, sample_rate: int):
        self.session, self.sample_rate = session, sample_rate
        self.socket = None
        self.events: asyncio.Queue[dict] = asyncio.Queue()
        self.seen: list[dict] = []  # every event so far, in the order the session sent them
        self.closed: int | None = None  # the close code, once closed for good
        self._reader: asyncio.Task | None = None
        self._closing = False

    async def connect(self) -> None:
        session = self.session
        url = f"{session.url.replace('http', 'ws', 1)}/sessions/{session.id}/speech?sample_rate={self.sample_rate}"
        token = session.info.get("speaker_token")  # the speech socket needs no more than the session's speaker token
        self.socket = await websockets.connect(url, max_size=None, open_timeout=30, additional_headers=bearer(token))
        self._reader = asyncio.ensure_future(self._read(self.socket))

    async def reconnect(self) -> None:
        old, reader = self.socket, self._reader
        await self.connect()
        if reader is not None:
            reader.cancel()
        await old.close()

    async def send(self, pcm16: bytes) -> None:
        await self._send(pcm16)

    async def end_segment(self) -> None:
        await self._send(json.dumps({"type": "segment_end"}))

    async def interrupt(self) -> None:
        await self._send(json.dumps({"type": "interrupt"}))

    async def _send(self, message) -> None:
        try:
            await self.socket.send(message)
        except websockets.ConnectionClosed:
            if not (self.session.follow and not self.session.closed):
                raise
            self.session.gone("the speech socket closed")
            await self.session.moved()  # then on the new session's socket
            await self.socket.send(message)

    async def event(self, kind: str | None = None, timeout: float = 60) -> dict:
        """The next event (of `kind`, skipping others)."""
        deadline = time.monotonic() + timeout
        while True:
            event = await asyncio.wait_for(self.events.get(), max(0.0, deadline - time.monotonic()))
            if kind is None or event["type"] == kind or event["type"] in ("error", "closed"):
                return event

    def note(self, event: dict) -> None:
        event.setdefault("received", time.monotonic())
        self.seen.append(event)
        self.events.put_nowait(event)

    async def _read(self, socket) -> None:
        try:
            async for message in socket:
                if isinstance(message, str):
                    event = json.loads(message)
                    self.note(event)
                    if event["type"] == "going_away":
                        self.session.gone("its replica is shutting down")
        except websockets.ConnectionClosed:
            pass
        finally:
            if socket is self.socket:  # (a socket left behind by a move says nothing)
                code = socket.close_code
                if not self._closing and code in GONE_CODES and self.session.follow and not self.session.closed:
                    self.session.gone(f"the speech socket closed ({code})")
                else:
                    self.closed = code
                    self.note({"type": "closed", "code": code, "reason": socket.close_reason})

    async def close(self) -> None:
        self._closing = True
        if self.socket is not None:
            await self.socket.close()
        if self._reader is not None:
            self._reader.cancel()
