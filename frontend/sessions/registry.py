"""The sessions of this front end: created, found, watched, ended (by DELETE, or when
nobody has watched or spoken to one for `idle_seconds`).

A session lives in the process that created it (its clock, its generation, its
viewers' connections), so behind a load balancer every request for one session
must reach the same replica: the session URLs carry the id, and Kubernetes'
Ingress routes them by a cookie or by the id (the README's Kubernetes section).
Its Triton requests go, like every other request's, to the shared Triton.
"""
from __future__ import annotations

import asyncio
import logging
import secrets
import threading

from frontend import metrics
from frontend.admission import LiveSlots
from frontend.avatars.store import Avatar
from frontend.exceptions import SessionNotFound
from frontend.sessions import viewers
from frontend.sessions.idle import IdleCycles
from frontend.sessions.session import Session, SessionOptions

log = logging.getLogger("musetalk.frontend")


class Sessions:
    def __init__(self, client, slots: LiveSlots, idle_seconds: float,
                 ice_servers: list[dict], idle_cycles: IdleCycles):
        self.client, self.slots, self.idle_seconds = client, slots, idle_seconds
        self.ice_servers, self.idle_cycles = ice_servers, idle_cycles
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()

    def create(self, avatar: Avatar, options: SessionOptions) -> Session:
        self.slots.take()
        try:
            session = Session(secrets.token_urlsafe(12), avatar, self.client, options, self.idle_cycles).start()
        except BaseException:
            self.slots.release()  # a session that could not be built holds nothing
            raise
        with self._lock:
            self._sessions[session.id] = session
        metrics.SESSIONS.inc()
        return session

    def get(self, session_id: str) -> Session:
        with self._lock:
            session = self._sessions.get(session_id)
        if session is None or session.closed.is_set():
            raise SessionNotFound(f"unknown session {session_id!r} (ended, or never created here)")
        return session

    def all(self) -> list[Session]:
        with self._lock:
            return list(self._sessions.values())

    async def end(self, session_id: str) -> None:
        """End a session: its viewers are disconnected, its Triton requests cancelled."""
        with self._lock:
            session = self._sessions.pop(session_id, None)
        if session is None:
            raise SessionNotFound(f"unknown session {session_id!r} (ended, or never created here)")
        try:
            session.close()  # from here no viewer joins
            for viewer in session.viewers:
                session.remove_viewer(viewer.id)
                await viewer.close()
            await asyncio.to_thread(session.closed.wait, 30)
        finally:
            self.slots.release()
            metrics.SESSIONS.dec()

    async def watch(self, session_id: str, offer_sdp: str) -> viewers.Viewer:
        session = self.get(session_id)

        async def gone(viewer: viewers.Viewer) -> None:
            if session.remove_viewer(viewer.id) is not None:
                await viewer.close()

        return await viewers.connect(session, offer_sdp, self.ice_servers, gone)

    async def unwatch(self, session_id: str, viewer_id: str) -> None:
        viewer = self.get(session_id).remove_viewer(viewer_id)
        if viewer is None:
            raise SessionNotFound(f"session {session_id!r} has no viewer {viewer_id!r}")
        await viewer.close()

    async def expire(self) -> None:
        """End the sessions nobody has watched or spoken to for `idle_seconds` (and those
        whose thread has stopped)."""
        for session in self.all():
            if session.idle_for() > self.idle_seconds or session.closed.is_set():
                log.info("session %s ended: no viewer and no speech for %.0f s", session.id, session.idle_for())
                try:
                    await self.end(session.id)
                except SessionNotFound:
                    pass  # ended meanwhile

    async def keep_expiring(self, every_s: float = 1.0) -> None:
        """Expire sessions every `every_s` for as long as the service runs: an unexpected error
        is logged and counted (musetalk_session_housekeeping_errors_total), and the loop goes on."""
        while True:
            await asyncio.sleep(every_s)
            try:
                await self.expire()
            except Exception:  # noqa: BLE001 - one bad pass must not end expiry for good
                metrics.SESSION_ERRORS.inc()
                log.exception("expiring sessions failed; trying again in %g s", every_s)

    async def close(self) -> None:
        for session in self.all():
            try:
                await self.end(session.id)
            except SessionNotFound:
                pass
        self.idle_cycles.close()
