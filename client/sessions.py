"""Conversational sessions from Python: open one on the front end, watch it over WebRTC
(WHEP, with aiortc), speak into it. Needs `pip install "musetalk-triton[sessions]"`.

    from client.sessions import AvatarSession

    session = await AvatarSession.open("http://localhost:8080", fps=25)
    viewer = await session.watch()                       # WebRTC: frames and audio arrive
    speech = await session.speech(sample_rate=16000)
    await speech.send(pcm16)                             # as fast as your TTS makes it
    await speech.end_segment()
    event = await speech.event()                         # speech_started, speech_finished, ...
    frame = await viewer.video.get()                     # Received(frame=av.VideoFrame, arrived, ...)
    await session.close()

Every frame that arrives says when its first RTP packet arrived (`arrived`,
time.monotonic) and its RTP timestamp, before any jitter buffer or decoder:
what latency and lip-sync measurements need.
"""
from __future__ import annotations

import asyncio
import json
import time
from collections import OrderedDict
from dataclasses import dataclass

import av
import httpx
import websockets
from aiortc import RTCConfiguration, RTCIceServer, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError

BUFFER_SECONDS = 10.0  # frames kept for a reader that falls behind (the oldest go first)


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

    def __init__(self, url: str, info: dict, http: httpx.AsyncClient):
        self.url, self.info, self.http = url.rstrip("/"), info, http
        self.id = info["id"]
        self.viewers: list[Viewer] = []
        self.speeches: list[Speech] = []

    @classmethod
    async def open(cls, url: str, avatar_id: str | None = None, fps: int = 25, **options) -> AvatarSession:
        """POST /sessions; `options`: transition_frames, silence_dbfs."""
        http = httpx.AsyncClient(base_url=url, timeout=30)
        try:
            body = {"fps": fps, **({"avatar_id": avatar_id} if avatar_id else {}), **options}
            info = _check(await http.post("/sessions", json=body)).json()
        except BaseException:
            await http.aclose()
            raise
        return cls(url, info, http)

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
        # The cookies of this session's answers go along: behind a load balancer with cookie
        # affinity they are what brings the socket to the replica that holds the session.
        cookies = "; ".join(f"{name}={value}" for name, value in self.http.cookies.items())
        speech = Speech(await websockets.connect(
            f"{self.url.replace('http', 'ws', 1)}/sessions/{self.id}/speech?sample_rate={sample_rate}",
            max_size=None, open_timeout=30, additional_headers={"Cookie": cookies} if cookies else None))
        self.speeches.append(speech)
        return speech

    async def close(self) -> None:
        """End the session (DELETE), and close what this object opened."""
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


class Viewer:
    """A WHEP viewer: `video` and `audio` are queues of `Received` frames (a frame of None
    when the track has ended)."""

    def __init__(self, session: AvatarSession):
        self.session = session
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[
            RTCIceServer(urls=s["urls"], username=s.get("username"), credential=s.get("credential"))
            for s in session.info.get("ice_servers", [])]))
        self.video: asyncio.Queue[Received] = asyncio.Queue()
        self.audio: asyncio.Queue[Received] = asyncio.Queue()
        self.location: str | None = None
        self._tasks: list[asyncio.Task] = []

    async def connect(self) -> None:
        transceivers = [self.pc.addTransceiver(kind, direction="recvonly") for kind in ("video", "audio")]
        arrivals = [_probe(t.receiver) for t in transceivers]
        await self.pc.setLocalDescription(await self.pc.createOffer())  # gathers every candidate first
        response = _check(await self.session.http.post(
            self.session.info["whep"], content=self.pc.localDescription.sdp,
            headers={"Content-Type": "application/sdp"}))
        self.location = response.headers["Location"]
        await self.pc.setRemoteDescription(RTCSessionDescription(response.text, "answer"))
        for transceiver, noted, out in zip(transceivers, arrivals, (self.video, self.audio)):
            self._tasks.append(asyncio.ensure_future(self._read(transceiver.receiver.track, noted, out)))

    @staticmethod
    async def _read(track, arrivals: _Arrivals, out: asyncio.Queue) -> None:
        try:
            while True:
                frame = await track.recv()
                timestamp = arrivals.timestamp(frame.pts)
                if out.qsize() > BUFFER_SECONDS * 50:
                    out.get_nowait()
                out.put_nowait(Received(frame, arrivals.at(timestamp), timestamp))
        except MediaStreamError:
            out.put_nowait(Received(None, time.monotonic(), 0))

    async def close(self, delete: bool = True) -> None:
        if delete and self.location:
            response = await self.session.http.delete(self.location)
            if response.status_code != 404:  # the session may have ended already
                _check(response)
        for task in self._tasks:
            task.cancel()
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


def _probe(receiver) -> _Arrivals:
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
    """The speech socket: PCM in, segment ends, interrupts; events out."""

    def __init__(self, socket):
        self.socket = socket
        self.events: asyncio.Queue[dict] = asyncio.Queue()
        self.seen: list[dict] = []  # every event so far, in the order the session sent them
        self.closed: int | None = None  # the close code, once closed
        self._reader = asyncio.ensure_future(self._read())

    async def send(self, pcm16: bytes) -> None:
        await self.socket.send(pcm16)

    async def end_segment(self) -> None:
        await self.socket.send(json.dumps({"type": "segment_end"}))

    async def interrupt(self) -> None:
        await self.socket.send(json.dumps({"type": "interrupt"}))

    async def event(self, kind: str | None = None, timeout: float = 60) -> dict:
        """The next event (of `kind`, skipping others)."""
        deadline = time.monotonic() + timeout
        while True:
            event = await asyncio.wait_for(self.events.get(), max(0.0, deadline - time.monotonic()))
            if kind is None or event["type"] == kind or event["type"] in ("error", "closed"):
                return event

    async def _read(self) -> None:
        try:
            async for message in self.socket:
                if isinstance(message, str):
                    event = json.loads(message)
                    event["received"] = time.monotonic()
                    self.seen.append(event)
                    self.events.put_nowait(event)
        except websockets.ConnectionClosed:
            pass
        finally:
            self.closed = self.socket.close_code
            self.events.put_nowait({"type": "closed", "code": self.socket.close_code,
                                    "reason": self.socket.close_reason})

    async def close(self) -> None:
        await self.socket.close()
        self._reader.cancel()
