"""MuseTalk's Triton client SDK: one named call per model, numpy in and out.

Needs only numpy and tritonclient (`pip install musetalk-triton`); the tensor
contract it checks inputs against is `contract.specs`.
"""
from client.aio import AsyncMuseTalkClient
from client.client import MuseTalkClient
from client.errors import (
    DeadlineExceeded,
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
    "DeadlineExceeded",
]
