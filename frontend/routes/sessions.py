"""Conversational sessions: an avatar always on screen, watched over WebRTC (WHEP), speaking
the speech a voice agent sends it, segment by segment, interrupted at once.

    POST   /sessions                       JSON {avatar_id, fps, ...} -> 201 {id, whep, speech, viewer_token,
                                           speaker_token, ...}
    GET    /sessions, /sessions/{id}       state, frames sent, latency figures, Triton calls
    DELETE /sessions/{id}                  ends it (viewers disconnected, Triton requests cancelled)
    POST   /sessions/{id}/tokens           fresh viewer and speaker tokens
    POST   /sessions/{id}/whep             an SDP offer (application/sdp) -> 201, the SDP answer, Location
    DELETE /sessions/{id}/whep/{viewer}    that viewer leaves
    POST   /sessions/{id}/publish          JSON {"whip": URL, "token": ...} or {"rtmp": URL} -> 201 the
                                           publication (frontend/sessions/publishing.py)
    DELETE /sessions/{id}/publish/{pub}    that publication stops

Who may (with API keys: frontend/access.py): the owner's key everything; a viewer token of the
session its WHEP offer and its viewer's DELETE (publishing: the owner only); a speaker token its speech socket (in
`Authorization`, or `?token=` from a browser); either token its GET. Anyone else: 404, as for a
session that does not exist; a token in the wrong role: 403.

    WebSocket /sessions/{id}/speech?sample_rate=16000
        client -> server: binary 16-bit little-endian mono PCM, at any pace (a TTS sends faster than
                          real time: it is queued and played in real time); {"type": "segment_end"}
                          ends a segment (an utterance); {"type": "interrupt"} is barge-in
        server -> client: {"type": "speech_started", "segment"} when its first frame leaves;
                          {"type": "speech_finished", "segment", "played_seconds", "interrupted"};
                          {"type": "going_away", "seconds_left"} when the replica shuts down (open a
                          new session and move there); the socket closes with 1001 when it does;
                          {"type": "progress", "segment", "played_seconds", "queued_seconds",
                          "behind_seconds"} twice a second while speech plays; in order, each when
                          it happens (a segment's speech_started always before its speech_finished)
        errors:           {"type": "error", "error", "status"} and close code 4000 + status
        a socket that closes in the middle of a segment ends it there: what arrived plays, and the
        next socket (at its own sample_rate) speaks a new segment
"""
from __future__ import annotations

import asyncio
import time

from fastapi import APIRouter, Depends, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field, model_validator

from contract import logs
from frontend.access import SPEAKER, VIEWER, Caller, audit
from frontend.errors import UnsupportedMediaType, refuse_websocket
from frontend.exceptions import OfferError, SessionNotFound, SpeechSocketBusy
from frontend.routes.auth import any_caller, key_holder
from frontend.routes.speech_socket import int_parameter, read_speech
from frontend.services import Services, services
from frontend.sessions import publishing
from frontend.sessions.session import Session

router = APIRouter(prefix="/sessions", tags=["sessions"])
MAX_OFFER_BYTES = 64 * 1024
SPEAKER_HANDOVER_S = 1.0  # how long a new speech socket waits for the one before it to be gone


class NewSession(BaseModel):
    avatar_id: str | None = Field(None, description="a prepared avatar (default: the configured one)")
    fps: int = Field(25, ge=1, le=60)
    transition_frames: int | None = Field(None, ge=0, le=25, description="fade length between the avatar's "
                                          "own face and speech (default: MUSETALK_SESSION_TRANSITION_FRAMES)")
    silence_dbfs: float | None = Field(None, le=0, description="frames whose audio window is quieter show the "
                                       "avatar's own face (default: MUSETALK_SESSION_SILENCE_DBFS; "
                                       "null: generate every speech frame)")


class Destination(BaseModel):
    whip: str | None = Field(None, description="a WHIP endpoint (an SFU's room): the session publishes to it "
                             "over WebRTC")
    token: str | None = Field(None, description="the WHIP endpoint's Bearer token")
    rtmp: str | None = Field(None, description="an RTMP ingest's URL, its stream key as its last part")

    @model_validator(mode="after")
    def _one(self) -> Destination:
        if (self.whip is None) == (self.rtmp is None):
            raise ValueError('give one destination: {"whip": URL, "token": ...} or {"rtmp": URL}')
        if self.token is not None and self.whip is None:
            raise ValueError("a token goes with a whip destination")
        return self


def describe(session: Session) -> dict:
    return {**session.status(), "whep": f"/sessions/{session.id}/whep", "speech": f"/sessions/{session.id}/speech"}


def session_for(s: Services, session_id: str, caller: Caller, *roles: str) -> Session:
    """The session, if `caller` may act on it (its owner's key, or a token of it in `roles`)."""
    session = s.sessions.get(session_id)
    s.access.for_session(session, caller, roles)
    logs.bind(session=session.id)
    return session


@router.post("", status_code=201)
def create_session(request: NewSession, s: Services = Depends(services), caller: Caller = Depends(key_holder)):
    """Open a session: the avatar is on screen (idle) from now on, for whoever watches it
    (`whep`, with the `viewer_token`), speaking whatever `speech` receives (with the
    `speaker_token`). It ends by DELETE, or after MUSETALK_SESSION_IDLE_SECONDS without a viewer
    and without speech."""
    avatar = s.avatar(request.avatar_id, caller)
    chosen = request.model_dump(include=request.model_fields_set & {"transition_frames", "silence_dbfs"})
    session = s.sessions.create(avatar, s.session_options(request.fps, **chosen), caller.tenant)
    audit(caller, "created", "session", session.id)
    body = {**describe(session), **s.access.session_tokens(session.id), "ice_servers": session.ice_servers,
            "synthetic_weights": s.synthetic_weights()}
    return JSONResponse(body, status_code=201, headers={"Location": f"/sessions/{session.id}"})


@router.get("")
def list_sessions(s: Services = Depends(services), caller: Caller = Depends(key_holder)):
    """The caller's sessions on this replica."""
    return {"sessions": [describe(session) for session in s.sessions.of(caller.tenant)]}


@router.get("/{session_id}")
def get_session(session_id: str, s: Services = Depends(services), caller: Caller = Depends(any_caller)):
    return describe(session_for(s, session_id, caller, VIEWER, SPEAKER))


@router.delete("/{session_id}")
async def delete_session(session_id: str, s: Services = Depends(services), caller: Caller = Depends(any_caller)):
    session_for(s, session_id, caller)
    await s.sessions.end(session_id)
    audit(caller, "deleted", "session", session_id)
    return {"deleted": session_id}


@router.post("/{session_id}/tokens", status_code=201)
def new_tokens(session_id: str, s: Services = Depends(services), caller: Caller = Depends(any_caller)):
    """Fresh viewer and speaker tokens of the session (its owner's key only)."""
    session_for(s, session_id, caller)
    return s.access.session_tokens(session_id)


@router.post("/{session_id}/whep", status_code=201, response_class=Response,
             responses={201: {"content": {"application/sdp": {}}, "description": "the SDP answer"}})
async def watch(session_id: str, request: Request, s: Services = Depends(services),
                caller: Caller = Depends(any_caller)):
    """WHEP: POST an SDP offer (`application/sdp`, non-trickle: every candidate in it), with the
    session's viewer token (or its owner's key) as `Authorization: Bearer`; get the SDP answer.
    `Location` is the viewer, whose DELETE (with the same token) ends it."""
    session_for(s, session_id, caller, VIEWER)
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/sdp":
        raise UnsupportedMediaType(f"a WHEP offer is application/sdp, not {kind or 'no Content-Type'}")
    offer = await request.body()
    if len(offer) > MAX_OFFER_BYTES:
        raise OfferError(f"the SDP offer is over {MAX_OFFER_BYTES // 1024} kB")
    viewer = await s.sessions.watch(session_id, offer.decode("utf-8", "replace"))
    links = [ice_link(url, server) for server in viewer.session.ice_servers
             for url in ([server["urls"]] if isinstance(server["urls"], str) else server["urls"])]
    headers = {"Location": f"/sessions/{session_id}/whep/{viewer.id}", **({"Link": ", ".join(links)} if links else {})}
    return Response(viewer.pc.localDescription.sdp, status_code=201, media_type="application/sdp", headers=headers)


def ice_link(url: str, server: dict) -> str:
    """A WHEP Link header's ICE server: its URL, and its credentials where it has some."""
    link = f'<{url}>; rel="ice-server"'
    if server.get("username"):
        link += f'; username="{server["username"]}"; credential="{server["credential"]}"; credential-type="password"'
    return link


@router.delete("/{session_id}/whep/{viewer_id}")
async def stop_watching(session_id: str, viewer_id: str, s: Services = Depends(services),
                        caller: Caller = Depends(any_caller)):
    session_for(s, session_id, caller, VIEWER)
    await s.sessions.unwatch(session_id, viewer_id)
    return {"deleted": viewer_id}


@router.post("/{session_id}/publish", status_code=201)
async def publish(session_id: str, destination: Destination, s: Services = Depends(services),
                  caller: Caller = Depends(any_caller)):
    """Send the session, as its viewers see it, to a media server that fans it out (its owner's key
    only, to a destination under MUSETALK_PUBLISH_TO): over WHIP to an SFU's room, or over RTMP to
    a streaming ingest. A destination that goes away is tried again until the publication is
    deleted; its `state` is in the session's status and its speech socket's `publish_state` events."""
    session = session_for(s, session_id, caller)
    settings = s.settings
    if destination.whip is not None:
        publishing.check_destination("whip", destination.whip, settings.publish_to)
        publication = publishing.WhipPublication(session, destination.whip, destination.token)
    else:
        publishing.check_destination("rtmp", destination.rtmp, settings.publish_to)
        publication = publishing.RtmpPublication(session, destination.rtmp, settings.webrtc_video_kbps,
                                                 session.options.keyframe_seconds, settings.x264_preset)
    session.add_publication(publication, settings.max_publications_per_session)
    publication.start()
    audit(caller, "published", "session", f"{session_id} to {publishing.shown(publication.url)}")
    return JSONResponse(publication.status(), status_code=201,
                        headers={"Location": f"/sessions/{session_id}/publish/{publication.id}"})


@router.delete("/{session_id}/publish/{publication_id}", status_code=204)
async def unpublish(session_id: str, publication_id: str, s: Services = Depends(services),
                    caller: Caller = Depends(any_caller)):
    session = session_for(s, session_id, caller)
    publication = session.remove_publication(publication_id)
    if publication is None:
        raise SessionNotFound(f"session {session_id!r} has no publication {publication_id!r}")
    await publication.stop()
    audit(caller, "unpublished", "session", f"{session_id} from {publishing.shown(publication.url)}")
    return Response(status_code=204)


@router.websocket("/{session_id}/speech")
async def speech(websocket: WebSocket, session_id: str, sample_rate: str = "16000"):
    s: Services = websocket.app.state.services
    await websocket.accept()
    try:
        caller = s.access.caller(websocket.headers, websocket.query_params)
        session = session_for(s, session_id, caller, SPEAKER)
        rate = int_parameter("sample_rate", sample_rate, 8000, 96000, " Hz")
        # A client that closes its socket and opens another at once (a new sample rate) may come
        # back before the old one's end has run here: it gets a moment, not a refusal.
        for _ in range(round(SPEAKER_HANDOVER_S / 0.02)):
            if session.speaker is None:
                break
            await asyncio.sleep(0.02)
        if session.speaker is not None:
            raise SpeechSocketBusy("this session already has a speech socket; close it first")
    except Exception as error:  # noqa: BLE001 - every refusal is an error message and a close code
        await refuse_websocket(websocket, error)
        return
    session.speaker = websocket
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()

    def notify(event: dict, at: float) -> None:  # on the session's thread, in order: sent in that order, when due
        loop.call_soon_threadsafe(events.put_nowait, (at, event))

    session.listen(notify)
    segment_open = [False]  # speech sent since the last segment_end or interrupt
    sender = asyncio.create_task(_send_events(websocket, events))
    receiver = asyncio.create_task(_receive_speech(websocket, session, rate, s.settings.session_queue_seconds,
                                                   segment_open))
    try:
        done, _ = await asyncio.wait({sender, receiver}, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            task.result()  # raises what ended it
    except WebSocketDisconnect:
        pass
    except Exception as error:  # noqa: BLE001 - the client hears why; the session goes on
        await refuse_websocket(websocket, error)
    finally:
        if segment_open[0]:  # the socket ended mid-segment: the segment ends where its audio does
            session.segment_end()
        session.unlisten(notify)
        session.speaker = None
        for task in (sender, receiver):
            task.cancel()


async def _send_events(websocket: WebSocket, events: asyncio.Queue) -> None:
    while True:
        at, event = await events.get()
        await asyncio.sleep(max(0.0, at - time.monotonic()))
        await websocket.send_json(event)
        if event["type"] == "session_ended":  # 1001 (going away) when the replica shut down
            draining = event.get("reason") == "draining"
            await websocket.close(code=1001 if draining else 1000,
                                  reason="this replica shut down" if draining else f"the session {event['reason']}")
            return
        if event["type"] == "error" and event.get("status") == 413:  # a segment over the limit, as /ws/live
            await websocket.close(code=4413, reason=event["error"][:120])
            return


async def _receive_speech(websocket: WebSocket, session: Session, rate: int, max_queued_s: float,
                          segment_open: list[bool]) -> None:
    def speak(pcm16: bytes) -> None:
        session.speak(pcm16, rate)
        segment_open[0] = True

    def then_closed(action):
        def command() -> None:
            action()
            segment_open[0] = False
        return command

    # back-pressure: past `max_queued_s` of unplayed speech, the audio waits in the socket
    await read_speech(websocket, speak, {"segment_end": then_closed(session.segment_end),
                                         "interrupt": then_closed(session.interrupt)},
                      hold=lambda: session.backlog_seconds > max_queued_s)
