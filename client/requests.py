"""What the sync and asyncio clients share: validation, splitting, request building."""
from __future__ import annotations

import importlib

import numpy as np

from client.errors import InvalidInput, ModelNotReady, ServerUnavailable, TritonClientError
from contract import specs

DEFAULT_URLS = {"grpc": "localhost:8001", "http": "localhost:8000"}


def protocol_module(protocol: str, aio: bool = False):
    """tritonclient.grpc / tritonclient.http, or their asyncio variants."""
    if protocol not in DEFAULT_URLS:
        raise ValueError(f"protocol must be 'grpc' or 'http', not {protocol!r}")
    return importlib.import_module(f"tritonclient.{protocol}{'.aio' if aio else ''}")


def connection_kwargs(protocol: str, timeout_s: float) -> dict:
    """Client-constructor timeouts: a CPU server may take minutes on a full batch."""
    if protocol == "http":
        return {"connection_timeout": min(timeout_s, 60.0), "network_timeout": timeout_s}
    return {}


def validate(spec: specs.ModelSpec, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Check names, dtypes, shapes and batch agreement against the model's contract."""
    expected = [t.name for t in spec.inputs]
    if sorted(inputs) != sorted(expected):
        raise InvalidInput(f"expects inputs {expected}, got {sorted(inputs)}", spec.name)
    arrays = {}
    for tensor in spec.inputs:
        array = np.asarray(inputs[tensor.name])
        try:
            tensor.check(array)
        except ValueError as error:
            raise InvalidInput(str(error), spec.name) from None
        arrays[tensor.name] = np.ascontiguousarray(array)
    if len({len(a) for a in arrays.values()}) > 1:
        sizes = {k: len(v) for k, v in arrays.items()}
        raise InvalidInput(f"inputs disagree on the batch size: {sizes}", spec.name)
    return arrays


def batch_slices(batch: int, max_batch: int) -> list[slice]:
    return [slice(i, min(i + max_batch, batch)) for i in range(0, batch, max_batch)]


def split(model: str, inputs: dict[str, np.ndarray]) -> tuple[specs.ModelSpec | None, list[dict]]:
    """The requests `inputs` become: checked against the model's contract and cut
    at its max batch. A model that is not one of ours is sent as it is."""
    spec = specs.MODELS.get(model)
    if spec is None:
        return None, [inputs]
    arrays = validate(spec, inputs)
    batch = len(next(iter(arrays.values())))
    if batch == 0:
        raise InvalidInput("empty batch", model)
    return spec, [{k: v[s] for k, v in arrays.items()} for s in batch_slices(batch, spec.max_batch_size)]


def merge(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The answers of split requests, back together in order."""
    if len(parts) == 1:
        return parts[0]
    return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}


def statistics_kwargs(protocol: str) -> dict:
    return {"as_json": True} if protocol == "grpc" else {}


def infer_kwargs(protocol: str, timeout_s: float, priority: int = 0) -> dict:
    """tritonclient's infer arguments: the deadline (gRPC) and the priority (0: the model's default
    level; contract.priority says which level is whose)."""
    return {"priority": int(priority), **({"client_timeout": timeout_s} if protocol == "grpc" else {})}


def not_ready(url: str, timeout_s: float, server_ready: bool, waiting: list[str]) -> TritonClientError:
    """The error of a wait_until_ready that timed out, saying what was not ready."""
    if not server_ready:
        return ServerUnavailable(f"Triton at {url} not ready after {timeout_s:.0f} s")
    return ModelNotReady(f"models not ready after {timeout_s:.0f} s: {', '.join(waiting)}")


def make_inputs(module, arrays: dict[str, np.ndarray], arena=None) -> list:
    from tritonclient.utils import np_to_triton_dtype

    inputs = []
    for name, array in arrays.items():
        tensor = module.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
        if arena is not None:
            arena.put(tensor, name, array)
        else:
            tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


def make_outputs(module, spec: specs.ModelSpec | None, arena=None, batch: int = 0) -> list | None:
    if spec is None:
        return None  # unknown model: let the server return all its outputs
    outputs = []
    for tensor in spec.outputs:
        output = module.InferRequestedOutput(tensor.name)
        if arena is not None:
            arena.receive(output, tensor.name, batch)
        outputs.append(output)
    return outputs


def read_outputs(result, spec: specs.ModelSpec | None, arena=None) -> dict[str, np.ndarray]:
    if spec is None:
        response = result.get_response(as_json=True) if hasattr(result, "get_response") else {}
        names = [o["name"] for o in response.get("outputs", [])]
        return {name: result.as_numpy(name) for name in names}
    if arena is not None:
        return {t.name: arena.read(t.name, result) for t in spec.outputs}
    return {t.name: result.as_numpy(t.name) for t in spec.outputs}


class NamedCalls:
    """One method per model; `_call` is the sync or asyncio transport. `priority` is the request's
    level in Triton's queues (contract.priority.Priority: 1 goes first; 0, the default, is the
    model's default level)."""

    def _call(self, spec: specs.ModelSpec, *arrays: np.ndarray, priority: int = 0):
        raise NotImplementedError

    def audio_encoder(self, input_features: np.ndarray, *, priority: int = 0):
        """Whisper log-mel [B, 80, 3000] float32 -> hidden states [B, 1500, 5, 384]."""
        return self._call(specs.AUDIO_ENCODER, input_features, priority=priority)

    def positional_encoding(self, audio_chunk: np.ndarray, *, priority: int = 0):
        """Per-frame audio windows [B, 50, 384] -> with positional encoding added."""
        return self._call(specs.POSITIONAL_ENCODING, audio_chunk, priority=priority)

    def unet(self, latents: np.ndarray, audio_embedding: np.ndarray, *, priority: int = 0):
        """Reference latents [B, 8, 32, 32] + audio [B, 50, 384] -> latents [B, 4, 32, 32]."""
        return self._call(specs.UNET, latents, audio_embedding, priority=priority)

    def vae_encoder(self, face_crop: np.ndarray, *, priority: int = 0):
        """uint8 BGR face crops [B, 256, 256, 3] -> reference latents [B, 8, 32, 32]."""
        return self._call(specs.VAE_ENCODER, face_crop, priority=priority)

    def vae_decoder(self, pred_latents: np.ndarray, *, priority: int = 0):
        """UNet latents [B, 4, 32, 32] -> uint8 BGR faces [B, 256, 256, 3]."""
        return self._call(specs.VAE_DECODER, pred_latents, priority=priority)

    def musetalk(self, audio_chunk: np.ndarray, latents: np.ndarray, *, priority: int = 0):
        """The ensemble: audio windows [B, 50, 384] + latents [B, 8, 32, 32] -> faces [B, 256, 256, 3]."""
        return self._call(specs.MUSETALK, audio_chunk, latents, priority=priority)
