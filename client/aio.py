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

from client.deadlines import UNKNOWN_S, Deadlines
from client.errors import translate
from client.readiness import wait_for_async
from client.requests import (
    DEFAULT_URLS,
    NamedCalls,
    infer_kwargs,
    make_inputs,
    make_outputs,
    merge,
    not_ready,
    protocol_module,
    read_outputs,
    split,
    statistics_kwargs,
)
from contract import specs


class AsyncMuseTalkClient(NamedCalls):
    """`timeout_s` as MuseTalkClient's: None (the default) gives each request a deadline from
    the work ahead of it and the server's measured pace (client.deadlines)."""

    def __init__(self, url: str | None = None, protocol: str = "grpc", max_in_flight: int = 4,
                 timeout_s: float | None = None):
        self.protocol = protocol
        self.url = url or DEFAULT_URLS[protocol]
        self.timeout_s = timeout_s
        self.deadlines = Deadlines(timeout_s)
        self.max_in_flight = max_in_flight
        self._module = protocol_module(protocol, aio=True)
        # aiohttp's conn_timeout bounds the whole request: a CPU server may need minutes.
        extra = {"conn_timeout": timeout_s or UNKNOWN_S} if protocol == "http" else {}
        self._client = self._module.InferenceServerClient(self.url, **extra)

    async def server_ready(self) -> bool:
        return await self._probe(self._client.is_server_ready())

    async def model_ready(self, model: str) -> bool:
        return await self._probe(self._client.is_model_ready(model))

    async def wait_until_ready(self, timeout_s: float = 60.0, models: list[str] | None = None) -> None:
        models = list(models or specs.MODELS)

        async def ready() -> bool:
            return await self.server_ready() and all([await self.model_ready(m) for m in models])

        if not await wait_for_async(ready, timeout_s):
            up = await self.server_ready()
            raise not_ready(self.url, timeout_s, up, [m for m in models if not (up and await self.model_ready(m))])

    async def statistics(self, model: str) -> dict:
        try:
            stats = await self._client.get_inference_statistics(model, **statistics_kwargs(self.protocol))
        except Exception as error:  # noqa: BLE001
            raise translate(error, model) from error
        return stats["model_stats"][0]

    @staticmethod
    async def _probe(answer) -> bool:
        try:
            return bool(await answer)
        except Exception:  # noqa: BLE001 - unreachable means not ready
            return False

    async def infer(self, model: str, inputs: dict[str, np.ndarray], priority: int = 0) -> dict[str, np.ndarray]:
        """Run `model` on `inputs`; `priority` as the named calls' (contract.priority)."""
        spec, parts = split(model, inputs)
        gate = asyncio.Semaphore(self.max_in_flight)

        async def send(part: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            async with gate:
                return await self._send(model, spec, part, priority)

        return merge(await asyncio.gather(*(send(p) for p in parts)))

    async def _call(self, spec: specs.ModelSpec, *arrays: np.ndarray, priority: int = 0) -> np.ndarray:
        names = [t.name for t in spec.inputs]
        return (await self.infer(spec.name, dict(zip(names, arrays)), priority))[spec.outputs[0].name]

    async def _send(self, model, spec, arrays, priority: int = 0) -> dict[str, np.ndarray]:
        ticket = self.deadlines.start(model, len(next(iter(arrays.values()))))
        try:
            inputs = make_inputs(self._module, arrays)
            outputs = make_outputs(self._module, spec)
            result = await self._client.infer(model, inputs, outputs=outputs,
                                              **infer_kwargs(self.protocol, ticket.deadline_s, priority))
            outputs = read_outputs(result, spec)
        except BaseException as error:  # noqa: BLE001 - cancelled too: the ticket ends either way
            self.deadlines.finish(ticket, answered=False)
            if not isinstance(error, Exception):
                raise
            raise ticket.failure(error) from error
        self.deadlines.finish(ticket, answered=True)
        return outputs

    async def close(self) -> None:
        await self._client.close()

    async def __aenter__(self) -> AsyncMuseTalkClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
