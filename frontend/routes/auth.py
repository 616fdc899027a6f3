"""The routes' credentials: FastAPI dependencies over frontend/access.py (who may do what).

They declare the bearer scheme, so the OpenAPI page (/docs) has its Authorize button. Each
names the caller in the log lines of its request (contract.logs), never its credential."""
from __future__ import annotations

from fastapi import Depends
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.requests import HTTPConnection

from contract import logs
from frontend.access import Caller
from frontend.services import services

BEARER = HTTPBearer(auto_error=False, description="an API key (MUSETALK_API_KEYS_FILE), or a session's "
                    "viewer or speaker token where the route takes one")


async def key_holder(connection: HTTPConnection,
                     _: HTTPAuthorizationCredentials | None = Depends(BEARER)) -> Caller:
    """A caller with an API key (any caller, without keys): 401 otherwise."""
    caller = services(connection).access.key_holder(connection.headers)
    logs.bind(tenant=caller.name)
    return caller


async def any_caller(connection: HTTPConnection,
                     _: HTTPAuthorizationCredentials | None = Depends(BEARER)) -> Caller:
    """A caller with an API key or a session token (whose scope the route checks): 401 otherwise."""
    caller = services(connection).access.caller(connection.headers)
    logs.bind(tenant=caller.name if caller.holds_key else None, session=caller.session)
    return caller
