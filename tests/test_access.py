"""Who may do what, against a real front end with API keys (and the real local Triton): every
route and both WebSockets for no key, a wrong key, two tenants, a session's viewer and speaker
tokens and another session's; expired tokens; keys rotated without a restart; a storm of wrong
keys; pages of other sites; what the logs never hold; where the service agrees to listen."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import cv2
import httpx
import numpy as np
import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from client.readiness import wait_for
from support import KEYED_TENANT_LIVE_SESSIONS, KEYED_TOKEN_SECONDS, KEYS, ROOT, keys_file
from triton_local.processes import free_port

TOKEN_SECONDS = KEYED_TOKEN_SECONDS
TENANT_LIVE_SESSIONS = KEYED_TENANT_LIVE_SESSIONS


def auth(credential: str | None) -> dict:
    return {"Authorization": f"Bearer {credential}"} if credential else {}


@pytest.fixture(scope="module")
def http(keyed):
    with httpx.Client(base_url=keyed.url, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def alpha_sessions(http):
    """Two sessions of alpha's: the one the matrix works on, and another (whose tokens open nothing of the first)."""
    made = [http.post("/sessions", json={"fps": 12}, headers=auth(KEYS["alpha"])) for _ in range(2)]
    assert [m.status_code for m in made] == [201, 201], made[-1].text
    yield [m.json()["id"] for m in made]
    for m in made:
        http.delete(f"/sessions/{m.json()['id']}", headers=auth(KEYS["alpha"]))


def png(color: tuple[int, int, int], face_png: bytes) -> bytes:
    """The astronaut photograph with a colored border: another image of the same face."""
    image = cv2.imdecode(np.frombuffer(face_png, "uint8"), cv2.IMREAD_COLOR)
    image[:20] = color
    return cv2.imencode(".png", image)[1].tobytes()


def credentials(http, sessions: list[str]) -> dict[str, dict]:
    """Every kind of caller, with tokens minted now (they last TOKEN_SECONDS)."""
    mine = http.post(f"/sessions/{sessions[0]}/tokens", headers=auth(KEYS["alpha"])).json()
    other = http.post(f"/sessions/{sessions[1]}/tokens", headers=auth(KEYS["alpha"])).json()
    return {"none": {}, "wrong": auth("not-a-key-0123456789abcdef"), "alpha": auth(KEYS["alpha"]),
            "beta": auth(KEYS["beta"]), "viewer": auth(mine["viewer_token"]),
            "speaker": auth(mine["speaker_token"]), "other": auth(other["viewer_token"])}


WHO = ("none", "wrong", "alpha", "beta", "viewer", "speaker", "other")


def test_who_may_do_what_over_http(http, alpha_sessions, face_png):
    """Each cell: the status (and, where two reasons share one, what the message says). 422 and 415
    are answers past the credential check: bodies left invalid so that nothing is done."""
    s1 = alpha_sessions[0]
    assert http.post("/avatars", data={"avatar_id": "alphas"}, headers=auth(KEYS["alpha"]),
                     files={"file": ("a.png", png((0, 0, 255), face_png))}).status_code == 201
    rows = [  # (method, path, request arguments, expected per caller in WHO's order)
        ("GET", "/avatars", {}, (401, 401, 200, 200, 401, 401, 401)),
        ("POST", "/avatars", {"data": {"avatar_id": "x"}}, (401, 401, 422, 422, 401, 401, 401)),
        ("GET", "/avatars/alphas", {}, (401, 401, 200, 404, 401, 401, 401)),
        ("DELETE", "/avatars/no-such", {}, (401, 401, 404, 404, 401, 401, 401)),
        ("POST", "/onnx-infer", {}, (401, 401, 422, 422, 401, 401, 401)),
        ("POST", "/sessions", {"json": {"fps": 0}}, (401, 401, 422, 422, 401, 401, 401)),
        ("GET", "/sessions", {}, (401, 401, 200, 200, 401, 401, 401)),
        ("GET", f"/sessions/{s1}", {}, (401, 401, 200, 404, 200, 200, 404)),
        ("DELETE", f"/sessions/{s1}", {}, (401, 401, "skip", 404, 403, 403, 404)),
        ("POST", f"/sessions/{s1}/tokens", {}, (401, 401, 201, 404, 403, 403, 404)),
        ("POST", f"/sessions/{s1}/whep", {"content": b"v=0"}, (401, 401, 415, 404, 415, 403, 404)),
        ("DELETE", f"/sessions/{s1}/whep/no-such", {}, (401, 401, 404, 404, 404, 403, 404)),
        *[("GET", path, {}, (200,) * 7) for path in ("/healthz", "/readyz", "/metrics", "/info", "/")],
    ]
    wrong = []
    for method, path, arguments, expected in rows:
        callers = credentials(http, alpha_sessions)
        for who, status in zip(WHO, expected):
            if status == "skip":
                continue
            answer = http.request(method, path, headers=callers[who], **arguments)
            if answer.status_code != status:
                wrong.append(f"{method} {path} as {who}: {answer.status_code} (expected {status}) {answer.text[:80]}")
            elif status == 401 and answer.headers.get("www-authenticate", "").split()[0] != "Bearer":
                wrong.append(f"{method} {path} as {who}: 401 without WWW-Authenticate: Bearer")
    assert not wrong, "\n".join(wrong)
    # the two 404s of the viewer's DELETE: its own session has no such viewer, beta cannot see the session
    callers = credentials(http, alpha_sessions)
    assert "has no viewer" in http.delete(f"/sessions/{s1}/whep/no-such", headers=callers["viewer"]).text
    assert "unknown session" in http.delete(f"/sessions/{s1}/whep/no-such", headers=callers["beta"]).text
    # lists show only the caller's own
    assert {s["id"] for s in http.get("/sessions", headers=callers["alpha"]).json()["sessions"]} == set(alpha_sessions)
    assert http.get("/sessions", headers=callers["beta"]).json()["sessions"] == []
    assert "alphas" not in {a["id"] for a in http.get("/avatars", headers=callers["beta"]).json()["avatars"]}


def close_code(url: str, headers: dict | None = None, first: dict | None = None) -> int:
    """How a WebSocket ends: its close code, after sending `first` (a command that an authorised
    socket refuses with 4422: nothing is done)."""
    try:
        with connect(url, additional_headers=headers or {}, open_timeout=30) as socket:
            try:
                if first is not None:
                    socket.send(json.dumps(first))
                for _ in socket:
                    pass
            except ConnectionClosed:
                pass
            return socket.close_code
    except InvalidStatus as refused:  # closed before it opened (a page of another site)
        return 4000 + refused.response.status_code


def test_who_may_do_what_over_websockets(keyed, http, alpha_sessions):
    s1 = alpha_sessions[0]
    base = keyed.url.replace("http", "ws", 1)
    callers = credentials(http, alpha_sessions)
    speech = f"{base}/sessions/{s1}/speech?sample_rate=16000"
    bogus = {"type": "bogus"}
    expected = {"none": 4401, "wrong": 4401, "alpha": 4422, "beta": 4404, "viewer": 4403, "speaker": 4422,
                "other": 4404}
    got = {who: close_code(speech, headers, bogus) for who, headers in callers.items()}
    assert got == expected
    token = callers["speaker"]["Authorization"].split()[1]
    assert close_code(f"{speech}&token={token}", first=bogus) == 4422  # a browser's way: the query
    live = f"{base}/ws/live?fps=0"  # an authorised caller hears that fps must be 1..60 (4422)
    expected = {"none": 4401, "wrong": 4401, "alpha": 4422, "beta": 4422, "viewer": 4401, "speaker": 4401,
                "other": 4401}
    assert {who: close_code(live, headers) for who, headers in callers.items()} == expected
    assert close_code(f"{live}&token={KEYS['beta']}") == 4422


def test_pages_of_other_sites_are_refused_and_the_page_itself_is_not(keyed, http, alpha_sessions):
    token = credentials(http, alpha_sessions)["speaker"]["Authorization"].split()[1]
    speech = f"{keyed.url.replace('http', 'ws', 1)}/sessions/{alpha_sessions[0]}/speech?token={token}"
    assert close_code(speech, {"Origin": "https://evil.example"}, {"type": "bogus"}) == 4403
    own = keyed.url.replace("localhost", "127.0.0.1")
    assert close_code(speech.replace("localhost", "127.0.0.1"), {"Origin": own}, {"type": "bogus"}) == 4422
    hijack = http.post("/sessions", json={"fps": 12}, headers={**auth(KEYS["alpha"]), "Origin": "https://evil.example"})
    assert hijack.status_code == 403 and "not allowed" in hijack.json()["error"]
    assert "access-control-allow-origin" not in hijack.headers


def test_two_tenants_have_their_own_default_and_an_operator_shares_avatars(http, face_png):
    alpha, beta, ops = (auth(KEYS[t]) for t in ("alpha", "beta", "ops"))
    made = http.post("/avatars", data={"avatar_id": "default"}, headers=alpha,
                     files={"file": ("a.png", png((255, 0, 0), face_png))})
    assert made.status_code == 201 and made.json()["id"] == "default" and made.json()["shared"] is False
    assert http.get("/avatars/default", headers=alpha).json()["shared"] is False  # alpha's own
    assert http.get("/avatars/default", headers=beta).json()["shared"] is True  # the operator's
    refused = http.post("/avatars", data={"avatar_id": "house", "shared": "true"}, headers=beta,
                        files={"file": ("h.png", face_png)})
    assert refused.status_code == 403
    shared = http.post("/avatars", data={"avatar_id": "house", "shared": "true"}, headers=ops,
                       files={"file": ("h.png", face_png)})
    assert shared.status_code == 201 and shared.json()["shared"] is True
    for tenant in (alpha, beta):
        assert http.get("/avatars/house", headers=tenant).json()["shared"] is True
    assert http.delete("/avatars/house", headers=alpha).status_code == 403
    assert http.delete("/avatars/house", params={"shared": "true"}, headers=alpha).status_code == 403
    assert http.delete("/avatars/house", params={"shared": "true"}, headers=ops).status_code == 200
    assert http.get("/avatars/house", headers=beta).status_code == 404
    assert http.delete("/avatars/default", headers=alpha).status_code == 200  # its own; the shared one stays
    assert http.get("/avatars/default", headers=alpha).json()["shared"] is True


def test_one_tenant_cannot_take_every_live_session(http, alpha_sessions):
    """alpha holds its limit (the matrix's two sessions): a third is refused naming it; beta still gets one."""
    refused = http.post("/sessions", json={"fps": 12}, headers=auth(KEYS["alpha"]))
    assert refused.status_code == 429 and "'alpha'" in refused.json()["error"]
    assert "MUSETALK_TENANT_LIVE_SESSIONS" in refused.json()["error"]
    beta = http.post("/sessions", json={"fps": 12}, headers=auth(KEYS["beta"]))
    assert beta.status_code == 201
    assert http.delete(f"/sessions/{beta.json()['id']}", headers=auth(KEYS["beta"])).status_code == 200


def test_session_tokens_expire(http, alpha_sessions):
    tokens = http.post(f"/sessions/{alpha_sessions[0]}/tokens", headers=auth(KEYS["alpha"])).json()
    path = f"/sessions/{alpha_sessions[0]}"
    assert http.get(path, headers=auth(tokens["viewer_token"])).status_code == 200
    assert tokens["tokens_expire_in"] == TOKEN_SECONDS
    assert wait_for(lambda: http.get(path, headers=auth(tokens["viewer_token"])).status_code == 401,
                    TOKEN_SECONDS + 10, 0.5)
    expired = http.get(path, headers=auth(tokens["viewer_token"]))
    assert "expired" in expired.json()["error"]


def test_keys_rotate_without_a_restart(keyed, http):
    rotated = {**KEYS, "alpha": "alpha-new-key-0123456789abcdef"}
    keys_file(keyed.keys_file, rotated)
    try:
        assert wait_for(lambda: http.get("/avatars", headers=auth(rotated["alpha"])).status_code == 200, 15, 0.2)
        assert http.get("/avatars", headers=auth(KEYS["alpha"])).status_code == 401  # the old key is gone
        assert http.get("/avatars", headers=auth(KEYS["beta"])).status_code == 200  # the others stay
    finally:
        keys_file(keyed.keys_file, KEYS)
    assert wait_for(lambda: http.get("/avatars", headers=auth(KEYS["alpha"])).status_code == 200, 15, 0.2)


def metric(http, name: str, label: str) -> float:
    for line in http.get("/metrics").text.splitlines():
        if line.startswith(f"{name}{{") and label in line:
            return float(line.split()[-1])
    return 0.0


def test_a_storm_of_wrong_keys_is_refused_and_the_service_stays_responsive(keyed, http):
    before = metric(http, "musetalk_auth_failures_total", 'reason="unknown_key"')

    def wrong(i: int) -> int:
        with httpx.Client(base_url=keyed.url, timeout=30) as client:
            return [client.get("/avatars", headers=auth(f"guess-{i}-{j}-0123456789")).status_code for j in range(50)]

    health: list[float] = []
    with ThreadPoolExecutor(20) as pool:
        storm = [pool.submit(wrong, i) for i in range(20)]
        while not all(f.done() for f in storm):
            started = time.monotonic()
            assert http.get("/healthz").status_code == 200
            health.append(time.monotonic() - started)
        statuses = [status for f in storm for status in f.result()]
    assert len(statuses) == 1000 and set(statuses) == {401}
    assert metric(http, "musetalk_auth_failures_total", 'reason="unknown_key"') == before + 1000
    assert max(health) < 2.0, f"/healthz took up to {max(health):.2f} s during the storm"


def test_the_log_holds_audit_lines_and_never_a_key_or_a_token(keyed, http, alpha_sessions):
    tokens = credentials(http, alpha_sessions)
    speech = f"{keyed.url.replace('http', 'ws', 1)}/sessions/{alpha_sessions[0]}/speech"
    token = tokens["speaker"]["Authorization"].split()[1]
    close_code(f"{speech}?sample_rate=16000&token={token}", first={"type": "bogus"})  # a token in a query string
    log = keyed.log_file.read_text()
    assert f"alpha created session '{alpha_sessions[0]}'" in log and "alpha created avatar 'alphas'" in log
    assert "token=[redacted]" in log  # the access line of that socket, its token out
    for secret in [*KEYS.values(), token, *(h["Authorization"].split()[1] for h in tokens.values() if h)]:
        assert secret not in log
    assert "API keys read: 3 keys of 3 tenants" in log


def test_without_keys_the_service_listens_on_loopback_only(frontend_server):
    assert "open: no API keys, loopback only" in frontend_server.log_file.read_text()
    refused = subprocess.run([sys.executable, "-m", "frontend", "--host", "0.0.0.0", "--port", str(free_port())],
                             cwd=ROOT, capture_output=True, text=True, timeout=120,
                             env={**os.environ, "MUSETALK_TRITON_URL": "127.0.0.1:1"})
    assert refused.returncode == 2
    assert "refusing to listen on 0.0.0.0 without API keys" in refused.stderr
    assert "MUSETALK_API_KEYS_FILE" in refused.stderr


def test_a_session_opened_with_a_key_is_watched_and_spoken_to_with_its_tokens(keyed):
    """The SDK: the key opens the session; its viewer holds the viewer token, its speech socket the
    speaker token (the key is never sent on either)."""
    import asyncio

    from client.sessions import AvatarSession

    async def scenario():
        async with await AvatarSession.open(keyed.url, fps=12, api_key=KEYS["beta"]) as session:
            viewer = await session.watch()
            speech = await session.speech(16000)
            frame = await asyncio.wait_for(viewer.video.get(), 20)
            await speech.send(b"\0\0" * 16000)
            await speech.end_segment()
            finished = await speech.event("speech_finished", timeout=60)
            return frame, finished

    frame, finished = asyncio.run(scenario())
    assert frame.frame is not None and finished["type"] == "speech_finished"
