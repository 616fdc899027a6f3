"""The asyncio SDK: the same named calls as MuseTalkClient, as coroutines.

    async with AsyncMuseTalkClient("localhost:8001") as tc:
        faces = await tc.musetalk(audio_chunks, latents)

Split batches are sent concurrently (up to `max_in_flight`), which keeps
Triton's dynamic batcher fed without threads. Shared memory is offered by the
synchronous client only.
"""
from __future__ import annotations

import asyncio

import numpy as np

from client import specs
from client.errors import InvalidInput, ServerUnavailable, TritonClientError, translate
from client.requests import (
    DEFAULT_URLS,
    NamedCalls,
    batch_slices,
    make_inputs,
    make_outputs,
    protocol_module,
    read_outputs,
    validate,
)


class AsyncMuseTalkClient(NamedCalls):
    def __init__(self, url: str | None = None, protocol: str = "grpc", max_in_flight: int = 4,
                 timeout_s: float = 300.0):
        self.protocol = protocol
        self.url = url or DEFAULT_URLS[protocol]
        self.timeout_s = timeout_s
        self.max_in_flight = max_in_flight
        self._module = protocol_module(protocol, aio=True)
        # aiohttp's conn_timeout bounds the whole request: a CPU server may need minutes.
        extra = {"conn_timeout": timeout_s} if protocol == "http" else {}
        self._client = self._module.InferenceServerClient(self.url, **extra)

    async def server_ready(self) -> bool:
        try:
            return bool(await self._client.is_server_ready())
        except Exception:  # noqa: BLE001
            return False

    async def model_ready(self, model: str) -> bool:
        try:
            return bool(await self._client.is_model_ready(model))
        except Exception:  # noqa: BLE001
            return False

    async def wait_until_ready(self, timeout_s: float = 60.0, models: list[str] | None = None) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        models = list(models or specs.MODELS)
        while loop.time() < deadline:
            if await self.server_ready() and all([await self.model_ready(m) for m in models]):
                return
            await asyncio.sleep(0.25)
        raise ServerUnavailable(f"Triton at {self.url} or its models not ready after {timeout_s:.0f} s")

    async def statistics(self, model: str) -> dict:
        try:
            kwargs = {"as_json": True} if self.protocol == "grpc" else {}
            stats = await self._client.get_inference_statistics(model, **kwargs)
        except Exception as error:  # noqa: BLE001
            raise translate(error, model) from error
        return stats["model_stats"][0]

    async def infer(self, model: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        spec = specs.MODELS.get(model)
        if spec is None:
            return await self._send(model, None, inputs)
        arrays = validate(spec, inputs)
        batch = len(next(iter(arrays.values())))
        if batch == 0:
            raise InvalidInput("empty batch", model)
        gate = asyncio.Semaphore(self.max_in_flight)

        async def send(part: slice) -> dict[str, np.ndarray]:
            async with gate:
                return await self._send(model, spec, {k: v[part] for k, v in arrays.items()})

        parts = await asyncio.gather(*(send(s) for s in batch_slices(batch, spec.max_batch_size)))
        return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}

    async def _call(self, spec: specs.ModelSpec, *arrays: np.ndarray) -> np.ndarray:
        names = [t.name for t in spec.inputs]
        return (await self.infer(spec.name, dict(zip(names, arrays))))[spec.outputs[0].name]

    async def _send(self, model, spec, arrays) -> dict[str, np.ndarray]:
        try:
            inputs = make_inputs(self._module, arrays)
            outputs = make_outputs(self._module, spec)
            timeout = {"client_timeout": self.timeout_s} if self.protocol == "grpc" else {}
            result = await self._client.infer(model, inputs, outputs=outputs, **timeout)
            return read_outputs(result, spec)
        except Exception as error:  # noqa: BLE001
            raise translate(error, model) from error

    async def close(self) -> None:
        await self._client.close()

    async def __aenter__(self) -> "AsyncMuseTalkClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()


__all__ = ["AsyncMuseTalkClient", "TritonClientError"]
