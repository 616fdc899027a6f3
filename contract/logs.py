"""Logging, configured once when a process starts: every line with its time, level, logger and
what it belongs to (the request, session and tenant), as text or as JSON for log collectors.

    python -m frontend                        # configure() before uvicorn starts, access log included
    MUSETALK_LOG_FORMAT=json python -m frontend
    MUSETALK_LOG_LEVEL=DEBUG ...

Python drops INFO lines when nothing is configured, and uvicorn configures only its own
loggers: without this, the service's own lines (a drain, a preparation, a session that moved,
Triton that went and came back) would never reach `kubectl logs`. Loggers are named after their
modules (`logging.getLogger(__name__)`). What a line belongs to comes from `context`: code that
serves a request or a session sets it (`with context(session="...")`), and every line logged
meanwhile, on that thread or task, says so. Keys and tokens never do: uvicorn logs no headers, and
every line has the values of credential query parameters (`?token=`: browsers cannot send a header
on a WebSocket) replaced before it is written, in the access log and anywhere else.
"""
from __future__ import annotations

import contextvars
import json
import logging
import logging.config
import os
import re
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

FORMATS = ("text", "json")
CONTEXT_KEYS = ("request", "session", "tenant")
_context: contextvars.ContextVar[dict | None] = contextvars.ContextVar("musetalk_log_context", default=None)
_CREDENTIALS = re.compile(r"([?&](?:token|access_token|api_key|key)=)[^&\s\"']+", re.IGNORECASE)


def redact(text: str) -> str:
    """`text` with the values of credential query parameters replaced: "/x?token=[redacted]"."""
    return _CREDENTIALS.sub(r"\1[redacted]", text)


@contextmanager
def context(**values: str | None) -> Iterator[None]:
    """Lines logged inside the block (this thread or task, and tasks it starts) carry `values`."""
    token = _context.set({**(_context.get() or {}), **{k: v for k, v in values.items() if v}})
    try:
        yield
    finally:
        _context.reset(token)


def current() -> dict:
    """What lines logged here now belong to (for threads started here: copy it over with `context`)."""
    return dict(_context.get() or {})


class ContextFilter(logging.Filter):
    """Puts the current context on every record (record.request, .session, .tenant; "" if none)."""

    def filter(self, record: logging.LogRecord) -> bool:
        values = _context.get() or {}
        for key in CONTEXT_KEYS:
            if not hasattr(record, key):
                setattr(record, key, values.get(key, ""))
        return True


class TextFormatter(logging.Formatter):
    """2026-12-07 10:02:03.123 INFO frontend.sessions.session [session=s1 tenant=acme] the message"""

    def format(self, record: logging.LogRecord) -> str:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record.created)) + f".{int(record.msecs):03d}"
        belongs = " ".join(f"{key}={value}" for key in CONTEXT_KEYS if (value := getattr(record, key, "")))
        line = f"{when} {record.levelname} {record.name}{f' [{belongs}]' if belongs else ''} " \
               f"{redact(record.getMessage())}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time (ISO 8601, UTC), level, logger, message, and the context."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
                 "level": record.levelname, "logger": record.name, "message": redact(record.getMessage())}
        entry.update({key: value for key in CONTEXT_KEYS if (value := getattr(record, key, ""))})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


# Libraries that log routine work at INFO: WebRTC's every ICE candidate pair and check (dozens of
# lines a viewer), httpx every request (the demo's progress polls, session forwarding): their
# warnings only, unless the level is DEBUG.
CHATTY = ("aioice", "aiortc", "httpx")


def settings(log_format: str | None = None, level: str | None = None) -> dict:
    """The logging.config.dictConfig dict: the root logger and uvicorn's (access log included) to
    stderr, in one format. uvicorn.Config(log_config=settings()) uses it as is."""
    log_format = (log_format or os.environ.get("MUSETALK_LOG_FORMAT") or "text").lower()
    if log_format not in FORMATS:
        raise ValueError(f"MUSETALK_LOG_FORMAT must be one of {', '.join(FORMATS)}, not {log_format!r}")
    level = (level or os.environ.get("MUSETALK_LOG_LEVEL") or "INFO").upper()
    if not isinstance(logging.getLevelName(level), int):
        raise ValueError(f"MUSETALK_LOG_LEVEL must be DEBUG, INFO, WARNING or ERROR, not {level!r}")
    formatter = f"{__name__}.{'JsonFormatter' if log_format == 'json' else 'TextFormatter'}"
    return {
        "version": 1, "disable_existing_loggers": False,
        "filters": {"context": {"()": f"{__name__}.ContextFilter"}},
        "formatters": {"line": {"()": formatter}},
        "handlers": {"stderr": {"class": "logging.StreamHandler", "stream": "ext://sys.stderr",
                                "formatter": "line", "filters": ["context"]}},
        "root": {"handlers": ["stderr"], "level": level},
        # uvicorn's own loggers go through the root's handler (propagate), not handlers of their own
        "loggers": {**{name: {"handlers": [], "propagate": True, "level": level}
                       for name in ("uvicorn", "uvicorn.error", "uvicorn.access")},
                    **{name: {"level": level if level == "DEBUG" else "WARNING"} for name in CHATTY}},
    }


def configure(log_format: str | None = None, level: str | None = None) -> dict:
    """Configure this process's logging (see `settings`); returns the dict, for uvicorn."""
    config = settings(log_format, level)
    logging.config.dictConfig(config)
    logging.captureWarnings(True)
    sys.excepthook = _log_uncaught
    return config


def _log_uncaught(kind, error, traceback) -> None:
    logging.getLogger(__name__).critical("the process failed", exc_info=(kind, error, traceback))


def bind(**values: str | None) -> None:
    """From here on, lines logged by this task or thread (and the tasks and threads' work it starts
    after this) carry `values` too: for a request's own task, where a `with` block cannot reach."""
    _context.set({**(_context.get() or {}), **{k: v for k, v in values.items() if v}})
