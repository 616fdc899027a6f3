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


class DeadlineExceeded(TritonClientError):
    """No answer within the request's deadline (client.deadlines says how it was set)."""


# What the server's answer means, by the status code tritonclient's exception
# carries: gRPC status codes, or HTTP statuses (Triton maps them alike).
_BY_STATUS = {
    "StatusCode.INVALID_ARGUMENT": InvalidInput, "400": InvalidInput,
    "StatusCode.NOT_FOUND": ModelNotFound, "404": ModelNotFound,
    "StatusCode.UNAVAILABLE": ServerUnavailable, "503": ModelNotReady,
    "StatusCode.DEADLINE_EXCEEDED": DeadlineExceeded,
}


def translate(error: BaseException, model: str | None) -> TritonClientError:
    """Map an exception from tritonclient / the transport to one of ours."""
    if isinstance(error, TritonClientError):
        return error
    if isinstance(error, (ConnectionError, OSError, TimeoutError)):  # aiohttp's errors are OSErrors
        return ServerUnavailable(f"cannot reach the Triton server ({error})", model)
    message = _message(error)
    status = getattr(error, "status", None)
    kind = _BY_STATUS.get(str(status() if callable(status) else status), InferenceFailed)
    # gRPC says UNAVAILABLE both for a refused connection and for a model Triton has not
    # (yet) loaded ("... has no available versions"): only the latter names a model.
    if kind is ServerUnavailable and "model" in message.lower():
        kind = ModelNotReady
    if kind is ServerUnavailable:
        return kind(f"cannot reach the Triton server ({message})", model)
    return kind(message, model)


def _message(error: BaseException) -> str:
    message = getattr(error, "message", None)
    text = message() if callable(message) else str(error)
    return text or type(error).__name__
