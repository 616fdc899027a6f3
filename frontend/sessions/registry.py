"""The sessions of this front end: created, found, watched, ended (by DELETE, when nobody has
watched or spoken to one for `idle_seconds`, or when the replica drains).

A session lives in the process that created it (its clock, its generation, its viewers'
connections); its id says which replica that is, and requests for it that reach another
replica are forwarded there (routing.py). Its Triton requests go, like every other
request's, to the shared Triton.
"""
from __future__ import annotations

import asyncio
import logging
import threading

from frontend import metrics
from frontend.admission import LiveSlots
from frontend.avatars.store import Avatar
from frontend.exceptions import Draining, SessionNotFound, TooManyViewers
from frontend.live_first import LiveFirst
from frontend.sessions import viewers
from frontend.sessions.idle import IdleCycles
from frontend.sessions.routing import SessionIds
from frontend.sessions.session import Session, SessionOptions
from frontend.sessions.turn import IceServers

log = logging.getLogger(__name__)


class Sessions:
    def __init__(self, client, slots: LiveSlots, idle_seconds: float, ice: IceServers, idle_cycles: IdleCycles,
                 ids: SessionIds | None = None, max_viewers: int = 8, live_first: LiveFirst | None = None):
        self.client, self.slots, self.idle_seconds = client, slots, idle_seconds
        self.live_first = live_first or LiveFirst(enabled=False)
        self.ice, self.idle_cycles, self.ids, self.max_viewers = ice, idle_cycles, ids or SessionIds(), max_viewers
        self.draining = False
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()

    def create(self, avatar: Avatar, options: SessionOptions, tenant: str | None = None) -> Session:
        """A new session of `tenant` (None: the open service's), started."""
        if self.draining:
            raise Draining("this replica is shutting down; open the session again (another replica takes it)")
        self.slots.take(tenant)
        try:
            session_id = self.ids.new()
            session = Session(session_id, avatar, self.client, options, self.idle_cycles,
                              self.ice.for_session(session_id), self.max_viewers, self.live_first, tenant).start()
        except BaseException:
            self.slots.release(tenant)  # a session that could not be built holds nothing
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

    def of(self, tenant: str | None) -> list[Session]:
        """The sessions of `tenant` (None: those of the open service)."""
        return [session for session in self.all() if session.tenant == tenant]

    async def end(self, session_id: str, reason: str = "ended") -> None:
        """End a session: its viewers are disconnected, its Triton requests cancelled; its speech
        socket hears `reason` ("ended", "expired", "draining")."""
        with self._lock:
            session = self._sessions.pop(session_id, None)
        if session is None:
            raise SessionNotFound(f"unknown session {session_id!r} (ended, or never created here)")
        try:
            session.close(reason)  # from here no viewer joins
            for publication in session.publications:
                session.remove_publication(publication.id)
                await publication.stop()
            for viewer in session.viewers:
                session.remove_viewer(viewer.id)
                await viewer.close()
            await asyncio.to_thread(session.closed.wait, 30)
        finally:
            self.slots.release(session.tenant)
            metrics.SESSIONS.dec()

    async def watch(self, session_id: str, offer_sdp: str) -> viewers.Viewer:
        session = self.get(session_id)
        if session.viewer_count >= self.max_viewers:  # before the work of an answer (checked again on joining)
            raise TooManyViewers(f"session {session_id!r} has its {self.max_viewers} viewers "
                                 "(MUSETALK_MAX_VIEWERS_PER_SESSION)")

        async def gone(viewer: viewers.Viewer) -> None:
            if session.remove_viewer(viewer.id) is not None:
                await viewer.close()

        return await viewers.connect(session, offer_sdp, session.ice_servers, gone)

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
                    await self.end(session.id, "expired")
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

    async def drain(self, seconds: float) -> None:
        """Refuse new sessions, tell every session's speech socket it is going away (with the
        seconds left: its client opens a new session elsewhere and moves there), wait until they
        have ended or `seconds` have passed, then end the rest."""
        self.draining = True
        sessions = self.all()
        log.info("draining: %d sessions told to move within %g s", len(sessions), seconds)
        for session in sessions:
            session.going_away(seconds)
        deadline = asyncio.get_running_loop().time() + seconds
        while self.all() and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.2)
        left = self.all()
        for session in left:
            try:
                await self.end(session.id, "draining")
            except SessionNotFound:
                pass
        log.info("drained: %d sessions moved, %d ended", len(sessions) - len(left), len(left))

    async def close(self) -> None:
        for session in self.all():
            try:
                await self.end(session.id)
            except SessionNotFound:
                pass
        self.idle_cycles.close()
