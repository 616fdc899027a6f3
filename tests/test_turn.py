"""Sessions through a real TURN relay (Debian's coturn, started here like the local Triton):
short-lived credentials minted per session from the relay's shared secret, viewers whose ICE
policy is relay-only (aiortc through the SDK, and Chromium on the page) watching through it,
and an expired credential refused by the relay itself."""
from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import time

import httpx
import pytest

from client.sessions import AvatarSession
from frontend.sessions.turn import credentials
from stack.frontend_process import FrontEnd
from stack.turn import LocalTurn
from support import BUILD
from triton_local.processes import free_port

TTL = 600


@pytest.fixture(scope="module")
def turn():
    with LocalTurn(folder=BUILD / "turn") as server:
        yield server


def stun(turn: LocalTurn) -> str:
    return f"stun:127.0.0.1:{turn.port}"


@pytest.fixture(scope="module")
def relayed(turn, triton, frontend_server):
    """A front end (on the test front end's avatars) that mints credentials for the local coturn."""
    server = FrontEnd(triton.grpc_url, free_port(), log_file=BUILD / "frontend-turn.log", host="127.0.0.1", env={
        "MUSETALK_AVATAR_DIR": frontend_server.env["MUSETALK_AVATAR_DIR"],
        "MUSETALK_TURN_URLS": f'["{turn.url}"]', "MUSETALK_TURN_SECRET": turn.secret,
        "MUSETALK_TURN_TTL_SECONDS": str(TTL),
        "MUSETALK_ICE_SERVERS": f'[{{"urls": "{stun(turn)}"}}]',  # coturn answers STUN too
    }).start()
    assert server.wait_until_ready(120), f"never ready; see {server.log_file}"
    yield server
    server.stop()


def test_each_session_gets_its_own_short_lived_turn_credentials(relayed, turn):
    """The TURN REST API convention: username "<expiry>:<session>", credential the HMAC of it with
    the shared secret; no static password is handed out, and every session's differ."""
    first, second = (httpx.post(f"{relayed.url}/sessions", json={"fps": 10}).json() for _ in range(2))
    try:
        for session in (first, second):
            static, minted = session["ice_servers"]
            assert static == {"urls": stun(turn)}
            assert minted["urls"] == [turn.url] and minted["credentialType"] == "password"
            expiry, name = minted["username"].split(":", 1)
            assert name == session["id"] and abs(int(expiry) - (time.time() + TTL)) < 30
            digest = hmac.new(turn.secret.encode(), minted["username"].encode(), hashlib.sha1).digest()
            assert minted["credential"] == base64.b64encode(digest).decode()
        assert first["ice_servers"][1]["username"] != second["ice_servers"][1]["username"]
    finally:
        for session in (first, second):
            httpx.delete(f"{relayed.url}/sessions/{session['id']}")


def relay_pair(pc) -> tuple[str, str]:
    """The candidate types (local, remote) of the pair an aiortc connection nominated for its media."""
    transport = next(t.receiver.transport for t in pc.getTransceivers()).transport
    connection = transport._connection
    pair = next(iter(connection._nominated.values()))
    return pair.local_candidate.type, pair.remote_candidate.type


def test_a_relay_only_aiortc_viewer_watches_through_coturn(relayed, turn):
    async def scenario():
        async with await AvatarSession.open(relayed.url, fps=10, relay_only=True) as session:
            viewer = await session.watch()
            offered = viewer.pc.localDescription.sdp
            frames = [await asyncio.wait_for(viewer.video.get(), 20) for _ in range(10)]
            return offered, frames, relay_pair(viewer.pc), session.id

    offered, frames, pair, session_id = asyncio.run(scenario())
    candidates = [line for line in offered.splitlines() if line.startswith("a=candidate")]
    assert candidates and all("typ relay" in line for line in candidates)  # nothing but the relay offered
    assert all(r.frame is not None and r.frame.width == 512 for r in frames)
    assert pair[0] == "relay"
    assert f":{session_id}>: incoming packet ALLOCATE processed, success" in turn.log()


def test_an_expired_credential_is_refused_by_the_relay(turn):
    """Credentials minted with the right secret but past their time: coturn refuses the allocation
    (401), so a relay-only peer gathers no candidate at all and cannot connect."""
    from aiortc import RTCConfiguration, RTCIceServer, RTCPeerConnection
    from aiortc.rtcconfiguration import RTCIceTransportPolicy

    expired = credentials(turn.secret, [turn.url], -60, "expired-viewer")
    valid = credentials(turn.secret, [turn.url], 60, "valid-viewer")

    async def gathered(server: dict) -> list[str]:
        ice = RTCIceServer(urls=server["urls"], username=server["username"], credential=server["credential"])
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[ice], iceTransportPolicy=RTCIceTransportPolicy.RELAY))
        pc.addTransceiver("video", direction="recvonly")
        await pc.setLocalDescription(await pc.createOffer())
        await pc.close()
        return [line for line in pc.localDescription.sdp.splitlines() if line.startswith("a=candidate")]

    assert asyncio.run(gathered(valid))  # the same relay, the same secret, in time: a candidate
    assert asyncio.run(gathered(expired)) == []
    assert f"user <{expired['username']}>: incoming packet message processed, error 401" in turn.log()


RELAY_PAIR = """async () => {
  const stats = await window.musetalk.pc.getStats();
  const local = {};
  let pair = null;
  stats.forEach((r) => {
    if (r.type === "local-candidate") local[r.id] = r.candidateType;
    if (r.type === "candidate-pair" && r.state === "succeeded" && r.nominated) pair = r;
  });
  return pair ? local[pair.localCandidateId] : null;
}"""


def test_a_relay_only_page_in_chromium_watches_through_coturn(browser, relayed, turn):
    context = browser.new_context()
    page = context.new_page()
    try:
        page.goto(f"{relayed.url}/?ice=relay")
        page.wait_for_function("window.musetalk.state === 'idle' && window.musetalk.presented > 10", timeout=30_000)
        assert page.evaluate(RELAY_PAIR) == "relay"
        session_id = page.evaluate("window.musetalk.session.id")
    finally:
        context.close()
    assert f":{session_id}>: incoming packet ALLOCATE processed, success" in turn.log()
