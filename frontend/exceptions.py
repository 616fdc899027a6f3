"""What live work refuses, in one module that imports nothing: the sessions, the live socket
and the routes raise these, and frontend/errors.py gives each its HTTP status and close code."""
from __future__ import annotations


class LiveError(ValueError):
    """A live session's input that cannot be used (the client gets it as an error message)."""


class LiveTooLong(LiveError):
    """More speech than a session may take."""


class LiveIdle(LiveError):
    """A live session whose client has sent nothing for too long."""


class SegmentTooLong(ValueError):
    """More speech in one segment than a session takes."""


class TooManySessions(RuntimeError):
    """Every live session slot is taken (a 429: retry after `retry_after` seconds)."""

    retry_after = 10


class TooManyViewers(RuntimeError):
    """A session already has as many viewers as it takes (429)."""

    retry_after = 5


class Draining(RuntimeError):
    """This replica is shutting down: new sessions go to another one (503, retry at once)."""

    retry_after = 1


class ClientGone(ConnectionError):
    """The client of a live path left while it was being sent to: its session ends quietly."""


class SessionNotFound(LookupError):
    """No session of that id (never created, ended, or on another replica)."""


class SpeechSocketBusy(RuntimeError):
    """The session already has a speech socket (two would mix their speech)."""


class PublishRefused(PermissionError):
    """A destination the operator has not allowed (MUSETALK_PUBLISH_TO), or not a URL of its kind (403)."""


class TooManyPublications(RuntimeError):
    """A session already publishes to as many destinations as it may (429)."""

    retry_after = 5


class OfferError(ValueError):
    """An SDP offer we cannot answer (the message says why)."""
