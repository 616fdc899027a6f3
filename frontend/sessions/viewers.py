"""WebRTC viewers of a session, by WHEP (the IETF WISH egress protocol): an SDP offer in,
an SDP answer out, then video and audio until the viewer leaves.

Each viewer is an aiortc peer connection with two tracks that hand aiortc the
session's packets (frontend/video/rtc.py): nothing is encoded per viewer. A
track sends each packet at its due time on the session's clock, the video
frame n and the audio of frame n at the same moment, so the RTCP sender
reports of both tracks map their timestamps to one wall clock and a player
keeps them in sync. Video: H.264 when the offer has it, else VP8; audio: Opus.

Non-trickle: the answer carries every ICE candidate (gathering is complete
before it is sent). Behind NAT, give TURN servers (MUSETALK_ICE_SERVERS).
"""
from __future__ import annotations

import asyncio
import logging
import uuid
from fractions import Fraction

import av
from aiortc import RTCConfiguration, RTCIceServer, RTCPeerConnection, RTCRtpSender, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from aiortc.sdp import SessionDescription

from frontend import metrics
from frontend.exceptions import OfferError
from frontend.video.rtc import AUDIO_RATE, VIDEO_CODECS, EncodedFrame

log = logging.getLogger(__name__)

QUEUE_SECONDS = 2.0  # packets a viewer may fall behind by before its oldest are dropped
DROPPED_SECONDS = 1.0  # a viewer that lost this much video for falling behind is dropped: it cannot keep up


class PacketTrack(MediaStreamTrack):
    """A track that gives aiortc already-encoded packets, each at its due time."""

    def __init__(self, kind: str, time_base: Fraction, capacity: int):
        super().__init__()
        self.kind, self.time_base = kind, time_base
        self.queue: asyncio.Queue = asyncio.Queue(capacity)
        self.dropped = 0

    def push(self, item) -> None:
        """(pts, data) or None (the end); on the event loop's thread."""
        while self.queue.full():
            self.queue.get_nowait()  # a stalled sender loses its oldest packets, not our memory
            self.dropped += 1
        self.queue.put_nowait(item)

    async def recv(self) -> av.Packet:
        if self.readyState != "live":
            raise MediaStreamError
        item = await self.queue.get()  # the session hands packets over when they are due
        if item is None:
            self.stop()
            raise MediaStreamError
        pts, data = item
        packet = av.Packet(data)
        packet.pts, packet.time_base = pts, self.time_base
        return packet


class Viewer:
    """One WHEP viewer: its peer connection and the tracks the session feeds."""

    def __init__(self, session, codec: str, fps: int, loop: asyncio.AbstractEventLoop, audio: bool = True):
        self.id = uuid.uuid4().hex[:16]
        self.session, self.codec, self.loop = session, codec, loop
        self.video = PacketTrack("video", Fraction(1, fps), round(QUEUE_SECONDS * fps))
        self.audio = PacketTrack("audio", Fraction(1, AUDIO_RATE), round(QUEUE_SECONDS * 50)) if audio else None
        self.pc: RTCPeerConnection | None = None
        self.on_gone = None  # async callable(viewer): the session lets it go
        self._waiting_for_keyframe = True
        self._dropping = False

    def publish(self, packets: list[tuple]) -> None:
        """Packets that are due now (from the session's thread): ("video", n, {codec: frame}),
        ("audio", sample, data)."""
        self.loop.call_soon_threadsafe(self._push, packets)

    def _push(self, packets: list[tuple]) -> None:
        for kind, pts, payload in packets:
            if kind == "audio":
                if self.audio is not None:
                    self.audio.push((pts, payload))
                continue
            video: EncodedFrame = payload.get(self.codec)
            if video is None or (self._waiting_for_keyframe and not video.keyframe):
                continue  # a decoder starts at a keyframe: the session sends one for a new viewer
            self._waiting_for_keyframe = False
            self.video.push((pts, video.data))
        if self.video.dropped >= DROPPED_SECONDS / self.video.time_base and not self._dropping:
            # Its sender has not taken its packets for QUEUE_SECONDS and more: a viewer that
            # cannot keep up is let go (its player reconnects) rather than fed a broken picture.
            self._dropping = True
            log.warning("viewer %s of session %s cannot keep up (%d frames dropped): dropped",
                        self.id, self.session.id, self.video.dropped)
            metrics.SESSION_VIEWERS_DROPPED.inc()
            if self.on_gone is not None:
                asyncio.ensure_future(self.on_gone(self))

    def end(self) -> None:
        """The session ended: the tracks stop, and with them the senders."""
        self.loop.call_soon_threadsafe(self._end)

    def _end(self) -> None:
        for track in (self.video, self.audio):
            if track is not None:
                track.push(None)

    async def close(self) -> None:
        self._end()
        if self.pc is not None:
            await self.pc.close()


def ice_configuration(servers: list[dict]) -> RTCConfiguration:
    """aiortc's configuration from MUSETALK_ICE_SERVERS (the browsers' RTCIceServer JSON).
    None means none: no STUN server is asked (aiortc would otherwise ask Google's)."""
    return RTCConfiguration(iceServers=[RTCIceServer(urls=s["urls"], username=s.get("username"),
                                                     credential=s.get("credential")) for s in servers])


def read_offer(sdp: str) -> tuple[list[str], bool]:
    """(the video codecs we send that the offer takes, in our order; whether it takes audio)."""
    try:
        description = SessionDescription.parse(sdp)
    except Exception as error:  # noqa: BLE001 - aiortc's parser raises many kinds
        raise OfferError(f"the SDP offer cannot be parsed: {error}") from None
    video = [m for m in description.media if m.kind == "video"]
    if not video:
        raise OfferError("the SDP offer has no video section (add a recvonly video transceiver)")
    names = {c.name.upper() for m in video for c in m.rtp.codecs}
    codecs = [codec for codec in VIDEO_CODECS if codec in names]
    if not codecs:
        raise OfferError(f"the SDP offer has no video codec we send ({' or '.join(VIDEO_CODECS)})")
    return codecs, any(m.kind == "audio" for m in description.media)


async def connect(session, offer_sdp: str, ice_servers: list[dict], on_gone) -> Viewer:
    """Answer a WHEP offer: a viewer of `session`, added to it once its connection is set up.
    `on_gone(viewer)` runs when the connection fails or closes."""
    codecs, audio = read_offer(offer_sdp)
    viewer = Viewer(session, codecs[0], session.fps, asyncio.get_running_loop(), audio)
    pc = viewer.pc = RTCPeerConnection(ice_configuration(ice_servers))
    try:
        # Our transceivers first, with the codec chosen: the offer's sections take them in order.
        video = pc.addTransceiver(viewer.video, direction="sendonly")
        video.setCodecPreferences([c for c in RTCRtpSender.getCapabilities("video").codecs
                                   if c.mimeType.upper() == f"VIDEO/{viewer.codec}"])
        if audio:
            pc.addTransceiver(viewer.audio, direction="sendonly")
        await pc.setRemoteDescription(RTCSessionDescription(offer_sdp, "offer"))
        await pc.setLocalDescription(await pc.createAnswer())  # gathers every candidate first
    except Exception as error:  # noqa: BLE001 - aiortc refuses bad offers with many kinds
        await pc.close()
        raise OfferError(f"the SDP offer cannot be answered: {error}") from None
    # A picture-loss report (PLI/FIR) asks for a keyframe: aiortc would force one in its own
    # encoder, which these packets bypass, so the session answers it (Session.picture_lost).
    video.sender._send_keyframe = lambda: session.picture_lost(viewer.codec)

    @pc.on("connectionstatechange")
    async def changed() -> None:
        if pc.connectionState in ("failed", "closed"):
            await on_gone(viewer)

    viewer.on_gone = on_gone
    try:
        session.add_viewer(viewer.id, viewer)  # refused if the session ended meanwhile
    except BaseException:
        await viewer.close()
        raise
    return viewer
