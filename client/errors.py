"""Clear exceptions for what goes wrong between the SDK and Triton.

Each names the model it concerns; `translate` turns tritonclient's and the
transport's failures into these, so callers catch one family of exceptions.
"""
from __future__ import annotations


class TritonClientError(RuntimeError):
    """Base class: something failed while calling `model` on Triton."""

    def __init__(self, message: str, model: str | None = None):
        super().__init__(f"{model}: {message}" if model else message)
        self.model = model


class ServerUnavailable(TritonClientError):
    """The server cannot be reached (not started, wrong address, network down)."""


class ModelNotFound(TritonClientError):
    """The server does not know this model."""


class ModelNotReady(TritonClientError):
    """The server knows the model but it is not (yet) loaded and ready."""


class InvalidInput(TritonClientError, ValueError):
    """An input has the wrong name, dtype or shape for the model."""


class InferenceFailed(TritonClientError):
    """The model ran and failed, or the server answered an unexpected error."""


def translate(error: BaseException, model: str | None) -> TritonClientError:
    """Map an exception from tritonclient / the transport to one of ours."""
    if isinstance(error, TritonClientError):
        return error
    if isinstance(error, (ConnectionError, OSError, TimeoutError)):
        return ServerUnavailable(f"cannot reach the Triton server ({error})", model)
    message = _message(error)
    status = str(getattr(error, "status", lambda: "")() or "")
    lowered = message.lower()
    if "unavailable" in status.lower() or "failed to connect" in lowered or "connection refused" in lowered:
        return ServerUnavailable(f"cannot reach the Triton server ({message})", model)
    if "unknown model" in lowered and "not found" in lowered:
        return ModelNotFound(message, model)
    if "not ready" in lowered or "no available versions" in lowered or "unknown model" in lowered:
        return ModelNotReady(message, model)
    if any(k in lowered for k in ("unexpected shape", "unexpected datatype", "expected", "unexpected inference input", "data type")):
        return InvalidInput(message, model)
    return InferenceFailed(message, model)


def _message(error: BaseException) -> str:
    message = getattr(error, "message", None)
    text = message() if callable(message) else str(error)
    return text or type(error).__name__
