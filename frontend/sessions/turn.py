"""Short-lived TURN credentials, minted per session from a secret the TURN server shares.

WebRTC media go straight between the front end's peer connections and the viewers, over UDP:
off a LAN (NATs, cloud firewalls) a TURN relay is what connects them, and aiortc cannot be
told to use a fixed UDP port range (aiortc#487) that a firewall could open instead. A static
TURN password handed to every client would be a password for anyone to relay anything. So
the front end mints credentials the way the TURN REST API convention says, which coturn
implements with `use-auth-secret` / `static-auth-secret`:

    username   = "<unix time of expiry>:<a name>"
    credential = base64(HMAC-SHA1(secret, username))

The TURN server recomputes the credential from the username and refuses it once the time in
it has passed: nothing is stored, a leaked credential dies by itself. coturn checks the
time at every authenticated request, the allocation's refreshes included, so the lifetime
(MUSETALK_TURN_TTL_SECONDS) must outlast the longest session.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import time


def credentials(secret: str, urls: list[str], ttl_s: float, name: str, now: float | None = None) -> dict:
    """An RTCIceServer (the browsers' JSON form) for `urls`, valid for `ttl_s` seconds."""
    expiry = int((time.time() if now is None else now) + ttl_s)
    username = f"{expiry}:{name}"
    digest = hmac.new(secret.encode(), username.encode(), hashlib.sha1).digest()
    return {"urls": list(urls), "username": username, "credential": base64.b64encode(digest).decode(),
            "credentialType": "password"}


class IceServers:
    """The ICE servers of a session's peer connections (ours and its viewers'): the static ones
    (MUSETALK_ICE_SERVERS: STUN), and TURN credentials minted for that session."""

    def __init__(self, static: list[dict], turn_urls: list[str], secret: str | None, ttl_s: float):
        self.static, self.turn_urls, self.secret, self.ttl_s = static, turn_urls, secret, ttl_s

    def for_session(self, name: str) -> list[dict]:
        if not (self.turn_urls and self.secret):
            return list(self.static)
        return [*self.static, credentials(self.secret, self.turn_urls, self.ttl_s, name)]
