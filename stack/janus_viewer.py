"""A subscriber of a Janus VideoRoom, through Janus' own HTTP API (aiortc): a viewer of a published
session that the front end never sees. Its `video` and `audio` are queues of client.sessions'
`Received` frames, like a WHEP viewer's, so stack.viewing's Watch reads either.

    viewer = await JanusViewer.join(janus.api, room, display="avatar")   # waits for the publisher
    frame = await viewer.video.get()
    await viewer.close()
"""
from __future__ import annotations

import asyncio
import time
import uuid

import httpx
from aiortc import RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError

from client.sessions import Received, probe_arrivals, read_frames


class JanusError(RuntimeError):
    """Janus refused a request, or the publisher never showed up."""


class JanusViewer:
    def __init__(self, api: str, http: httpx.AsyncClient):
        self.api, self.http = api, http
        self.video: asyncio.Queue[Received] = asyncio.Queue()
        self.audio: asyncio.Queue[Received] = asyncio.Queue()
        self.pc: RTCPeerConnection | None = None
        self.session: str | None = None
        self.handle: str | None = None
        self._tasks: list[asyncio.Task] = []

    @classmethod
    async def join(cls, api: str, room: int, display: str, timeout: float = 30.0) -> JanusViewer:
        viewer = cls(api, httpx.AsyncClient(timeout=40))
        try:
            await asyncio.wait_for(viewer._join(room, display), timeout)
        except BaseException:
            await viewer.close()
            raise
        return viewer

    async def _post(self, path: str, **message) -> dict:
        answer = (await self.http.post(f"{self.api}{path}", json={**message, "transaction": uuid.uuid4().hex})).json()
        if answer.get("janus") == "error":
            raise JanusError(f"Janus refused {message.get('janus')}: {answer['error']}")
        return answer

    async def _event(self) -> dict:
        """The next plugin event of this session (Janus' HTTP API: a long poll)."""
        while True:
            event = (await self.http.get(f"{self.api}/{self.session}?maxev=1")).json()
            if event.get("janus") == "event":
                return event

    async def _join(self, room: int, display: str) -> None:
        self.session = (await self._post("", janus="create"))["data"]["id"]
        self.handle = (await self._post(f"/{self.session}", janus="attach",
                                        plugin="janus.plugin.videoroom"))["data"]["id"]
        path = f"/{self.session}/{self.handle}"
        while True:  # the publisher may still be connecting
            listed = await self._post(path, janus="message", body={"request": "listparticipants", "room": room})
            feeds = [p["id"] for p in listed["plugindata"]["data"].get("participants", [])
                     if p.get("publisher") and p.get("display") == display]
            if feeds:
                break
            await asyncio.sleep(0.2)
        await self._post(path, janus="message",
                         body={"request": "join", "ptype": "subscriber", "room": room, "streams": [{"feed": feeds[0]}]})
        offer = (await self._event()).get("jsep")
        if offer is None:
            raise JanusError("Janus answered the subscription without an SDP offer")
        self.pc = pc = RTCPeerConnection()
        await pc.setRemoteDescription(RTCSessionDescription(offer["sdp"], offer["type"]))
        for transceiver in pc.getTransceivers():
            out = self.video if transceiver.kind == "video" else self.audio
            arrivals = probe_arrivals(transceiver.receiver)
            self._tasks.append(asyncio.ensure_future(self._read(transceiver.receiver.track, arrivals, out)))
        await pc.setLocalDescription(await pc.createAnswer())
        await self._post(path, janus="message", body={"request": "start"},
                         jsep={"type": "answer", "sdp": pc.localDescription.sdp})
        started = (await self._event())["plugindata"]["data"]
        if started.get("started") != "ok":
            raise JanusError(f"Janus did not start the subscription: {started}")

    @staticmethod
    async def _read(track, arrivals, out: asyncio.Queue) -> None:
        try:
            await read_frames(track, arrivals, out)
        except MediaStreamError:  # the subscription ended: the queue says so, as a WHEP viewer's does
            out.put_nowait(Received(None, time.monotonic(), 0))

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self.pc is not None:
            await self.pc.close()
        if self.session is not None:
            try:
                await self._post(f"/{self.session}", janus="destroy")
            except (httpx.HTTPError, JanusError, ValueError):
                pass  # Janus may be gone (a test killed it)
        await self.http.aclose()
