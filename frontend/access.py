"""Who may do what: API keys per tenant, session-scoped tokens, closed by default.

**API keys.** MUSETALK_API_KEYS_FILE holds one `TENANT:KEY` a line (`#` comments and blank
lines allowed; `TENANT:KEY:operator` for an operator, who may also publish and delete the
shared avatars every tenant uses). Callers send `Authorization: Bearer KEY` (a WebSocket may
send `?token=KEY`: browsers cannot set headers on one). The file is read again when it
changes, so keys rotate without a restart (two keys of one tenant are valid at once: add the
new one, move the clients, remove the old one). Keys are compared as SHA-256 digests, so how
long a lookup takes says nothing about the key. A missing or wrong key is a 401 with
`WWW-Authenticate: Bearer`, counted in `musetalk_auth_failures_total` by reason, never logged.

**Everything belongs to the tenant that made it.** Avatars, their preparations and sessions
are the caller's own: another tenant gets 404, as for something that does not exist, and lists
show only the caller's own and the shared avatars.

**Session tokens.** `POST /sessions` answers a `viewer_token` and a `speaker_token`, scoped to
that session and expiring after MUSETALK_SESSION_TOKEN_SECONDS (the owner's key mints fresh
ones: `POST /sessions/{id}/tokens`). A viewer token opens that session's WHEP endpoint (and
its viewer's DELETE); a speaker token its speech socket; either reads its status. Neither is an
API key, and neither opens anything of another session. A voice-agent backend holds the key;
the browser only ever gets a viewer token. Tokens are HMAC-signed by the process that holds
the session (requests for a session reach its replica: frontend/sessions/routing.py).

**Closed by default.** Without a keys file the service is open, and listens on loopback only
(`python -m frontend` refuses another address unless MUSETALK_OPEN_NETWORK says the network is
trusted): every caller is the operator, as on a developer's machine. /healthz, /readyz, /metrics,
/info and the page's files stay open in every mode (probes, Prometheus, the page asks for a key).
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import json
import logging
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from starlette.responses import JSONResponse

from frontend import metrics

log = logging.getLogger(__name__)
audit_log = logging.getLogger("frontend.audit")

VIEWER, SPEAKER = "viewer", "speaker"
TOKEN_PREFIX = "mts1"  # what tells a session token from an API key at a glance


class Unauthorized(PermissionError):
    """No credential, or one that is not valid here: 401 with WWW-Authenticate: Bearer."""


class Forbidden(PermissionError):
    """A valid credential that may not do this (a viewer token speaking, a tenant deleting a
    shared avatar), or a browser page of another site: 403."""


@dataclass(frozen=True)
class Caller:
    """Who a request comes from. `tenant` None: the open service's only caller (the operator)."""

    tenant: str | None
    operator: bool = False
    session: str | None = None  # the session a token is scoped to
    role: str = "key"  # "key", VIEWER or SPEAKER

    @property
    def holds_key(self) -> bool:
        return self.role == "key"

    @property
    def name(self) -> str:
        """For log lines and messages (never a credential)."""
        return self.tenant or "local"


OPEN = Caller(tenant=None, operator=True)


def bearer(headers, query_params=None) -> str | None:
    """The credential of a request: `Authorization: Bearer X`, else (WebSockets) `?token=X`."""
    header = headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    if query_params is not None and query_params.get("token"):
        return query_params["token"]
    return None


def fail(reason: str, message: str) -> Unauthorized:
    metrics.AUTH_FAILURES.labels(reason).inc()
    return Unauthorized(message)


class ApiKeys:
    """The keys file, read again whenever it changes (checked at most once a second)."""

    CHECK_EVERY_S = 1.0

    def __init__(self, path: Path):
        self.path = Path(path)
        self._keys: dict[bytes, tuple[str, bool]] = {}
        self._seen: tuple | None = None
        self._checked = 0.0
        self._lock = threading.Lock()
        self._read(initial=True)

    def tenant_of(self, key: str) -> tuple[str, bool] | None:
        """(tenant, operator) of `key`, None if it is no key of the file's."""
        self._refresh()
        return self._keys.get(hashlib.sha256(key.encode()).digest())

    @property
    def tenants(self) -> set[str]:
        return {tenant for tenant, _ in self._keys.values()}

    def _refresh(self) -> None:
        now = time.monotonic()
        if now - self._checked < self.CHECK_EVERY_S:
            return
        with self._lock:
            if now - self._checked >= self.CHECK_EVERY_S:
                self._checked = now
                self._read()

    def _read(self, initial: bool = False) -> None:
        try:
            stat = self.path.stat()
            seen = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
            if seen == self._seen:
                return
            keys = parse_keys(self.path.read_text())
        except (OSError, ValueError) as error:
            if initial:
                raise ValueError(f"MUSETALK_API_KEYS_FILE {self.path}: {error}") from None
            log.error("could not read the API keys file again (the keys read before stay valid): %s", error)
            return
        self._keys, self._seen = keys, seen
        tenants = sorted({tenant for tenant, _ in keys.values()})
        log.info("API keys %s: %d keys of %d tenants (%s)", "read" if initial else "read again", len(keys),
                 len(tenants), ", ".join(tenants))


def parse_keys(text: str) -> dict[bytes, tuple[str, bool]]:
    """{sha256(key): (tenant, operator)} of a keys file's text; ValueError naming a bad line."""
    from frontend.avatars.store import SAFE_ID

    keys = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        tenant, _, rest = line.partition(":")
        key, _, role = rest.partition(":")
        if not SAFE_ID.fullmatch(tenant) or not key or role not in ("", "operator"):
            raise ValueError(f"line {number} is not TENANT:KEY or TENANT:KEY:operator (tenant: 1-64 letters, "
                             "digits, '_' or '-')")
        if len(key) < 16:
            raise ValueError(f"line {number}: a key of fewer than 16 characters is too easy to guess")
        keys[hashlib.sha256(key.encode()).digest()] = (tenant, role == "operator")
    if not keys:
        raise ValueError("no keys in it (lines TENANT:KEY)")
    return keys


class SessionTokens:
    """Tokens scoped to one session and one role, signed with this process's secret."""

    def __init__(self, ttl_s: float, secret: bytes | None = None):
        self.ttl_s = ttl_s
        self._secret = secret or secrets.token_bytes(32)

    def mint(self, session_id: str, role: str) -> str:
        payload = _b64(json.dumps({"s": session_id, "r": role, "e": int(time.time() + self.ttl_s)}).encode())
        return f"{TOKEN_PREFIX}.{payload}.{self._sign(payload)}"

    def read(self, token: str) -> tuple[str, str] | None:
        """(session id, role) of a token of ours that has not expired; None if it is no token at
        all (an API key, say); Unauthorized if it is a bad or expired one."""
        parts = token.split(".")
        if len(parts) != 3 or parts[0] != TOKEN_PREFIX:
            return None
        _, payload, signature = parts
        if not hmac.compare_digest(signature, self._sign(payload)):
            raise fail("bad_token", "the session token is not valid (not signed by this service)")
        claims = json.loads(_unb64(payload))
        if claims["e"] < time.time():
            raise fail("expired_token", "the session token has expired: the session's owner mints fresh ones "
                                        "(POST /sessions/{id}/tokens)")
        return claims["s"], claims["r"]

    def _sign(self, payload: str) -> str:
        return _b64(hmac.new(self._secret, payload.encode(), hashlib.sha256).digest())


class Access:
    """Tells who a request comes from, and whether it may do what it asks."""

    def __init__(self, keys: ApiKeys | None, tokens: SessionTokens):
        self.keys, self.tokens = keys, tokens

    @property
    def open(self) -> bool:
        return self.keys is None

    def caller(self, headers, query_params=None) -> Caller:
        """Whoever sent the credential (a key's tenant, or a session token's holder); OPEN when
        the service has no keys. Unauthorized when none or a wrong one is sent."""
        if self.keys is None:
            return OPEN
        credential = bearer(headers, query_params)
        if credential is None:
            raise fail("missing", "send an API key: Authorization: Bearer <key> (MUSETALK_API_KEYS_FILE)")
        scoped = self.tokens.read(credential)
        if scoped is not None:
            return Caller(tenant=None, session=scoped[0], role=scoped[1])
        found = self.keys.tenant_of(credential)
        if found is None:
            raise fail("unknown_key", "the API key is not valid")
        return Caller(tenant=found[0], operator=found[1])

    def key_holder(self, headers, query_params=None) -> Caller:
        """A caller with an API key (not a session token)."""
        caller = self.caller(headers, query_params)
        if not caller.holds_key:
            raise fail("token_as_key", "a session token is not an API key: this needs the API key")
        return caller

    def for_session(self, session, caller: Caller, roles: tuple[str, ...] = ()) -> None:
        """`caller` may act on `session` (its owner's key, or a token of it in `roles`): else
        SessionNotFound for another tenant or another session's token (it cannot learn that it
        exists), Forbidden for a token of the session in another role."""
        from frontend.exceptions import SessionNotFound

        if caller.holds_key:
            if caller.tenant != session.tenant:
                metrics.AUTH_FAILURES.labels("other_tenant").inc()
                raise SessionNotFound(f"unknown session {session.id!r} (ended, or never created here)")
            return
        if caller.session != session.id:
            metrics.AUTH_FAILURES.labels("other_session").inc()
            raise SessionNotFound(f"unknown session {session.id!r} (ended, or never created here)")
        if caller.role not in roles:
            metrics.AUTH_FAILURES.labels("wrong_role").inc()
            needs = f"a {' or '.join(roles)} token or the owner's API key" if roles else "the owner's API key"
            raise Forbidden(f"a {caller.role} token cannot do this: it needs {needs}")

    def session_tokens(self, session_id: str) -> dict:
        return {"viewer_token": self.tokens.mint(session_id, VIEWER),
                "speaker_token": self.tokens.mint(session_id, SPEAKER),
                "tokens_expire_in": int(self.tokens.ttl_s)}


def audit(caller: Caller, action: str, what: str, name: str) -> None:
    """One line for every create and delete: who, what, which (never a credential)."""
    audit_log.info("%s %s %s %r", caller.name, action, what, name, extra={"tenant": caller.name})


# -- where the service listens ---------------------------------------------------------------
def loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def listening_problem(host: str, keys_file: Path | None, open_network: bool) -> str | None:
    """Why the service must not listen on `host` (None: it may)."""
    if keys_file is not None or loopback(host):
        return None
    if open_network:
        log.warning("OPEN: no API keys, listening on %s because MUSETALK_OPEN_NETWORK says this network is trusted: "
                    "anyone who reaches it may do anything", host)
        return None
    return (f"refusing to listen on {host} without API keys: anyone who reaches it could do anything. Set "
            "MUSETALK_API_KEYS_FILE (lines TENANT:KEY), listen on 127.0.0.1, or, on a network you trust, "
            "MUSETALK_OPEN_NETWORK=true")


def describe(access: Access, host: str) -> str:
    """The startup line that says who may do what."""
    if access.open:
        where = "loopback only" if loopback(host) else f"{host}: MUSETALK_OPEN_NETWORK"
        return f"open: no API keys, {where}"
    return f"API keys of {len(access.keys.tenants)} tenants ({access.keys.path}); session tokens last " \
           f"{access.tokens.ttl_s:g} s"


# -- browsers --------------------------------------------------------------------------------
class OriginCheck:
    """ASGI middleware: a request or WebSocket upgrade whose `Origin` is neither the page's own
    (the Host it was sent to) nor one of `allowed` is refused (403; a WebSocket is closed before
    it opens), so a page of another site cannot drive the service from a visitor's browser
    (cross-site WebSocket hijacking; on an open loopback service, anything at all). Requests
    without an Origin (curl, the SDK, servers) are not browsers' and pass."""

    def __init__(self, app, allowed: list[str]):
        self.app, self.allowed = app, {origin.rstrip("/").lower() for origin in allowed}

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        origin = headers.get("origin")
        if origin is None or self._allowed(origin, headers.get("host", "")):
            return await self.app(scope, receive, send)
        metrics.AUTH_FAILURES.labels("origin").inc()
        message = f"requests from pages of {origin} are not allowed here (MUSETALK_ALLOWED_ORIGINS)"
        if scope["type"] == "websocket":
            await receive()  # the connect
            return await send({"type": "websocket.close", "code": 4403, "reason": message[:120]})
        return await JSONResponse({"error": message}, status_code=403)(scope, receive, send)

    def _allowed(self, origin: str, host: str) -> bool:
        origin = origin.rstrip("/").lower()
        return origin in self.allowed or origin.split("://", 1)[-1] == host.lower()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def new_key() -> str:
    """A key to put in a keys file (`python -c 'from frontend.access import new_key; print(new_key())'`)."""
    return secrets.token_urlsafe(32)

