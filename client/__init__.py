"""MuseTalk's Triton client SDK: one named call per model, numpy in and out."""
from client.errors import (
    InferenceFailed,
    InvalidInput,
    ModelNotFound,
    ModelNotReady,
    ServerUnavailable,
    TritonClientError,
)

__all__ = [
    "MuseTalkClient",
    "AsyncMuseTalkClient",
    "TritonClientError",
    "ServerUnavailable",
    "ModelNotFound",
    "ModelNotReady",
    "InvalidInput",
    "InferenceFailed",
]


def __getattr__(name):
    # Lazy, so that `client.specs` stays importable without tritonclient (export/ uses it).
    if name == "MuseTalkClient":
        from client.client import MuseTalkClient

        return MuseTalkClient
    if name == "AsyncMuseTalkClient":
        from client.aio import AsyncMuseTalkClient

        return AsyncMuseTalkClient
    raise AttributeError(name)
