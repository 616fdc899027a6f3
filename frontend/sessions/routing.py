"""Every replica reaches every session: a session's id says which replica holds it, and a
request for it that lands on another replica is forwarded there.

A session lives in the process that created it (its clock, its generation, its peer
connections), so its URLs (GET/DELETE /sessions/{id}, WHEP offers and DELETEs, the speech
socket) must reach that replica. Behind a Service or an Ingress they land anywhere; a
cookie could pin a browser, but a WHEP player or an agent keeps none. So with several
replicas (MUSETALK_REPLICA_URL set: where the others reach this one, e.g. the pod's IP),
a session's id carries its replica's address, signed with a secret every replica shares
(MUSETALK_ROUTING_SECRET), and this middleware forwards a request for a session held
elsewhere to that address: HTTP as it is, the speech WebSocket both ways. WebRTC media
never pass through here: they go between the viewer and the session's replica (ICE).

The signature is what keeps a forged id from turning the front end into a proxy to any
address; a forwarded request carries FORWARDED, and is never forwarded again. A replica
that is gone answers nothing: the request gets 404 (the session has ended).
"""
from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import logging
import re
import secrets

log = logging.getLogger(__name__)

FORWARDED = "x-musetalk-forwarded"
SESSION_PATH = re.compile(r"^/sessions/([A-Za-z0-9_.-]+)(/.*)?$")
SIGNATURE_CHARS = 16
# Headers of a forwarded answer the client needs (the rest are the hop's: length, encoding, date).
ANSWER_HEADERS = ("content-type", "location", "link", "retry-after", "etag")


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class SessionIds:
    """New session ids, and the replica each id belongs to."""

    def __init__(self, replica_url: str = "", secret: str = ""):
        self.replica_url, self.secret = replica_url.rstrip("/"), secret.encode()

    def new(self) -> str:
        token = secrets.token_urlsafe(12).replace(".", "_")
        if not self.replica_url:
            return token
        address = _b64(self.replica_url.encode())
        return f"{token}.{address}.{self._sign(token, address)}"

    def owner(self, session_id: str) -> str | None:
        """The URL of the replica holding `session_id` if it is another one's (signed by a
        replica that shares our secret); None for ours, plain ids and forgeries."""
        parts = session_id.split(".")
        if len(parts) != 3 or not self.secret:
            return None
        token, address, signature = parts
        if not hmac.compare_digest(signature, self._sign(token, address)):
            return None
        try:
            url = _unb64(address).decode()
        except ValueError:
            return None
        return None if url == self.replica_url else url

    def _sign(self, token: str, address: str) -> str:
        return _b64(hmac.new(self.secret, f"{token}.{address}".encode(), hashlib.sha256).digest())[:SIGNATURE_CHARS]


class SessionRouter:
    """ASGI middleware: requests for sessions another replica holds go to that replica."""

    def __init__(self, app, ids: SessionIds, timeout_s: float = 30.0):
        self.app, self.ids, self.timeout_s = app, ids, timeout_s
        self._http = None

    async def __call__(self, scope, receive, send):
        owner = self._owner(scope)
        if owner is None:
            return await self.app(scope, receive, send)
        if scope["type"] == "http":
            return await self._forward_http(owner, scope, receive, send)
        return await self._forward_websocket(owner, scope, receive, send)

    def _owner(self, scope) -> str | None:
        if scope["type"] not in ("http", "websocket"):
            return None
        match = SESSION_PATH.match(scope.get("path", ""))
        if match is None or any(name == FORWARDED.encode() for name, _ in scope.get("headers", [])):
            return None
        return self.ids.owner(match.group(1))

    def _target(self, owner: str, scope) -> str:
        query = scope.get("query_string", b"").decode()
        return f"{owner}{scope['path']}" + (f"?{query}" if query else "")

    def _headers(self, scope, drop: tuple[str, ...]) -> list[tuple[str, str]]:
        kept = [(k.decode(), v.decode("latin-1")) for k, v in scope.get("headers", []) if k.decode() not in drop]
        return kept + [(FORWARDED, "1")]

    async def _forward_http(self, owner: str, scope, receive, send) -> None:
        import httpx

        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        if self._http is None:
            self._http = httpx.AsyncClient(timeout=self.timeout_s)
        headers = self._headers(scope, ("host", "content-length", "connection", "transfer-encoding"))
        try:
            answer = await self._http.request(scope["method"], self._target(owner, scope), content=body,
                                              headers=headers)
            status, content = answer.status_code, answer.content
            out = [(k.encode(), v.encode("latin-1")) for k, v in answer.headers.items() if k in ANSWER_HEADERS]
        except httpx.HTTPError as error:
            log.warning("session replica %s unreachable: %s", owner, error)
            status, content = 404, b'{"error": "unknown session: its replica is gone (the session has ended)"}'
            out = [(b"content-type", b"application/json")]
        await send({"type": "http.response.start", "status": status,
                    "headers": out + [(b"content-length", str(len(content)).encode())]})
        await send({"type": "http.response.body", "body": content})

    async def _forward_websocket(self, owner: str, scope, receive, send) -> None:
        import websockets

        first = await receive()  # websocket.connect
        if first["type"] != "websocket.connect":
            return
        url = self._target(owner.replace("http", "ws", 1), scope)
        headers = self._headers(scope, ("host", "connection", "upgrade", "sec-websocket-key",
                                        "sec-websocket-version", "sec-websocket-extensions", "cookie"))
        try:
            upstream = await websockets.connect(url, additional_headers=headers, max_size=None,
                                                open_timeout=self.timeout_s)
        except (OSError, websockets.WebSocketException, TimeoutError) as error:
            log.warning("session replica %s unreachable: %s", owner, error)
            await send({"type": "websocket.accept"})
            await send({"type": "websocket.send",
                        "text": '{"type": "error", "error": "unknown session: its replica is gone", "status": 404}'})
            await send({"type": "websocket.close", "code": 4404})
            return
        await send({"type": "websocket.accept"})

        async def downstream() -> None:  # the owner's messages to the client
            try:
                async for message in upstream:
                    key = "text" if isinstance(message, str) else "bytes"
                    await send({"type": "websocket.send", key: message})
            except websockets.ConnectionClosed:
                pass
            code = upstream.close_code or 1000
            await send({"type": "websocket.close", "code": code, "reason": upstream.close_reason or ""})

        async def upstream_pump() -> None:  # the client's messages to the owner
            while True:
                message = await receive()
                if message["type"] == "websocket.disconnect":
                    await upstream.close(code=message.get("code", 1000))
                    return
                data = message.get("bytes") if message.get("bytes") is not None else message.get("text")
                try:
                    await upstream.send(data)
                except websockets.ConnectionClosed:
                    return

        tasks = [asyncio.ensure_future(downstream()), asyncio.ensure_future(upstream_pump())]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await upstream.close()
