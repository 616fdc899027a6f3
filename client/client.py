"""The synchronous SDK: one named call per model, numpy arrays in and out.

    from client import MuseTalkClient
    with MuseTalkClient("localhost:8001") as tc:          # gRPC; "http" for port 8000
        faces = tc.musetalk(audio_chunks, latents)        # [N, 256, 256, 3] uint8 BGR

Inputs larger than the model's max_batch_size are split and sent as several
requests, up to `max_in_flight` at once, so Triton's dynamic batcher always has
work queued; the results come back concatenated in order.

`submit(client.musetalk, audio, latents)` starts a request and returns a Future
at once. Over gRPC it uses tritonclient's asynchronous call, so `cancel()` also
cancels the request on the server (what Triton 2.51 does with it: see `submit`).
"""
from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError, ThreadPoolExecutor
from typing import TypeVar

import numpy as np

from client.deadlines import UNKNOWN_S, Deadlines, Ticket
from client.errors import ServerUnavailable, translate
from client.readiness import wait_for
from client.requests import (
    DEFAULT_URLS,
    NamedCalls,
    connection_kwargs,
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
from client.shm import SharedMemoryArena
from contract import specs

T = TypeVar("T")


class MuseTalkClient(NamedCalls):
    """Calls MuseTalk's models on a Triton server over gRPC (default) or HTTP.

    Args:
        url: "host:port" (default localhost:8001 for gRPC, localhost:8000 for HTTP).
        protocol: "grpc" or "http".
        max_in_flight: requests kept in flight when an input is split into batches.
        timeout_s: every request's deadline in seconds. None (the default): each request's
            deadline follows from the work ahead of it and the server's measured pace
            (client.deadlines); `client.deadlines.seconds_per_item(model)` reads that pace.
            Over HTTP it bounds the connection's reads (default client.deadlines.UNKNOWN_S).
        shared_memory: pass tensors through system shared memory (same host only).
        priorities: send each call's `priority` (False: every request at the models' default
            level, whatever the calls say: to compare, or for a server without priority levels).
    """

    def __init__(self, url: str | None = None, protocol: str = "grpc", max_in_flight: int = 4,
                 timeout_s: float | None = None, shared_memory: bool = False, priorities: bool = True):
        self.protocol = protocol
        self.priorities = priorities
        self.url = url or DEFAULT_URLS[protocol]
        self.timeout_s = timeout_s
        self.deadlines = Deadlines(timeout_s)
        self.shared_memory = shared_memory
        self._module = protocol_module(protocol)
        self._local = threading.local()
        self._workers: list[_Worker] = []
        self._async = None  # the gRPC connection of submitted named calls
        self._async_lock = threading.Lock()
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_in_flight, thread_name_prefix="musetalk-client")
        # Separate threads for submit(): a submitted call that splits its batch
        # then waits on _pool without ever starving it.
        self._submitted = ThreadPoolExecutor(max_in_flight, thread_name_prefix="musetalk-submit")

    # -- health ---------------------------------------------------------------------------
    def server_ready(self) -> bool:
        return self._probe(lambda client: client.is_server_ready())

    def model_ready(self, model: str) -> bool:
        return self._probe(lambda client: client.is_model_ready(model))

    def wait_until_ready(self, timeout_s: float = 60.0, models: list[str] | None = None) -> None:
        """Block until the server and `models` (default: all of MuseTalk's) are ready."""
        models = list(models or specs.MODELS)
        if not wait_for(lambda: self.server_ready() and all(self.model_ready(m) for m in models), timeout_s):
            up = self.server_ready()
            raise not_ready(self.url, timeout_s, up, [m for m in models if not (up and self.model_ready(m))])

    def statistics(self, model: str) -> dict:
        """Triton's inference statistics of `model` as a dict (inference_count, execution_count...)."""
        try:
            stats = self._worker().client.get_inference_statistics(model, **statistics_kwargs(self.protocol))
        except Exception as error:  # noqa: BLE001
            raise translate(error, model) from error
        return stats["model_stats"][0]

    def model_config(self, model: str) -> dict:
        """The model's configuration as the server holds it (Triton's model config API, as JSON)."""
        try:
            config = self._worker().client.get_model_config(model, **statistics_kwargs(self.protocol))
        except Exception as error:  # noqa: BLE001
            raise translate(error, model) from error
        return config.get("config", config)

    def _probe(self, ask: Callable) -> bool:
        try:
            return bool(ask(self._worker().client))
        except Exception:  # noqa: BLE001 - unreachable means not ready
            self._drop_worker()
            return False

    # -- inference ------------------------------------------------------------------------
    def infer(self, model: str, inputs: dict[str, np.ndarray], priority: int = 0) -> dict[str, np.ndarray]:
        """Run `model` on `inputs` (name -> array with a leading batch axis); outputs by name.
        `priority`: the request's level in Triton's queues (contract.priority; 0: the model's default)."""
        spec, parts = split(model, inputs)
        if len(parts) == 1:
            return self._send(model, spec, parts[0], priority)
        futures = [self._pool.submit(self._send, model, spec, part, priority) for part in parts]
        return merge([f.result() for f in futures])

    def submit(self, call: Callable[..., T], *args, priority: int = 0) -> Future:
        """Start `call(*args)` (e.g. `client.musetalk, audio, latents`) and return its Future:
        keep several requests in flight without threads of your own. `priority` goes with a
        named call's request (contract.priority).

        A named call of this client over gRPC (without shared memory) is sent with
        tritonclient's asynchronous gRPC call, and `future.cancel()` cancels it on the server
        as well, until its answer has arrived. What Triton (2.51) then does: a request not yet
        executing never runs its next ensemble step (for `musetalk`, the vae_decoder is
        skipped even while the unet runs; Triton's statistics count the skipped step as a
        `fail` of that model); the step that is executing finishes (the onnxruntime backend
        cannot stop mid-batch). Anything else runs on the client's own threads, and `cancel()`
        only stops what has not started. The threads, and their connections, live as long as
        the client."""
        model = _named_model(self, call)
        if model is not None and self.protocol == "grpc" and not self.shared_memory:
            return self._start(specs.MODELS[model], args, priority)
        if model is not None:
            return self._submitted.submit(call, *args, priority=priority)
        return self._submitted.submit(call, *args)

    def _start(self, spec: specs.ModelSpec, arrays: tuple[np.ndarray, ...], priority: int = 0) -> Future:
        _, parts = split(spec.name, dict(zip([t.name for t in spec.inputs], arrays)))
        future = _Cancellable(len(parts), self.deadlines)
        try:
            client = self._async_client()
            for index, part in enumerate(parts):
                ticket = self.deadlines.start(spec.name, len(next(iter(part.values()))))
                future.tickets.append(ticket)

                def done(result, error, index=index, ticket=ticket) -> None:  # on gRPC's thread: must not raise
                    self.deadlines.finish(ticket, answered=error is None)
                    try:
                        if error is not None:
                            raise error
                        future.part_done(index, read_outputs(result, spec)[spec.outputs[0].name])
                    except BaseException as failure:  # noqa: BLE001 - the future carries it
                        future.part_failed(ticket.failure(failure))

                inputs, outputs = make_inputs(self._module, part), make_outputs(self._module, spec)
                # tritonclient's async_infer keeps the call on the client object between sending it
                # and adding the callback: two threads at once would swap their callbacks.
                with self._async_lock:
                    future.contexts.append(client.async_infer(
                        spec.name, inputs, done, outputs=outputs,
                        **infer_kwargs(self.protocol, ticket.deadline_s, self._level(priority))))
        except Exception as error:  # noqa: BLE001 - the future carries every failure
            future.cancel()
            failure = translate(error, spec.name)
            if isinstance(failure, ServerUnavailable):
                self._drop_async_client()
            future = Future()
            future.set_exception(failure)
        return future

    def _async_client(self):
        """One gRPC connection for asynchronous calls (a gRPC channel is thread-safe)."""
        with self._lock:
            if self._async is None:
                try:
                    self._async = self._module.InferenceServerClient(self.url)
                except Exception as error:  # noqa: BLE001
                    raise translate(error, None) from error
            return self._async

    def _drop_async_client(self) -> None:
        with self._lock:
            client, self._async = self._async, None
        if client is not None:
            _close_quietly(client)

    def _call(self, spec: specs.ModelSpec, *arrays: np.ndarray, priority: int = 0) -> np.ndarray:
        names = [t.name for t in spec.inputs]
        return self.infer(spec.name, dict(zip(names, arrays)), priority)[spec.outputs[0].name]

    def _level(self, priority: int) -> int:
        return priority if self.priorities else 0

    def _send(self, model: str, spec: specs.ModelSpec | None,
              arrays: dict[str, np.ndarray], priority: int = 0) -> dict[str, np.ndarray]:
        worker = self._worker()
        arena = worker.arena(spec) if (self.shared_memory and spec) else None
        batch = len(next(iter(arrays.values())))
        ticket = self.deadlines.start(model, batch)
        try:
            inputs = make_inputs(self._module, arrays, arena)
            outputs = make_outputs(self._module, spec, arena, batch)
            result = worker.client.infer(model, inputs, outputs=outputs,
                                         **infer_kwargs(self.protocol, ticket.deadline_s, self._level(priority)))
            outputs = read_outputs(result, spec, arena)
        except Exception as error:  # noqa: BLE001 - every failure gets a clear type
            self.deadlines.finish(ticket, answered=False)
            failure = ticket.failure(error)
            if isinstance(failure, ServerUnavailable):
                self._drop_worker()
            raise failure from error
        self.deadlines.finish(ticket, answered=True)
        return outputs

    # -- lifecycle ------------------------------------------------------------------------
    def _worker(self) -> _Worker:
        # tritonclient's HTTP client is not thread-safe: one connection per thread.
        worker = getattr(self._local, "worker", None)
        if worker is None:
            try:
                worker = _Worker(self._module.InferenceServerClient(
                    self.url, **connection_kwargs(self.protocol, self.timeout_s or UNKNOWN_S)))
            except Exception as error:  # noqa: BLE001
                raise translate(error, None) from error
            self._local.worker = worker
            with self._lock:
                self._workers.append(worker)
        return worker

    def _drop_worker(self) -> None:
        """Forget this thread's connection: a gRPC channel that failed to connect
        backs off for up to minutes, so a server that comes back would go unseen."""
        worker = getattr(self._local, "worker", None)
        if worker is not None:
            self._local.worker = None
            with self._lock:
                if worker in self._workers:  # (close() may have let them all go meanwhile)
                    self._workers.remove(worker)
            worker.close()

    def close(self) -> None:
        self._submitted.shutdown(wait=True)
        self._pool.shutdown(wait=True)
        with self._lock:
            for worker in self._workers:
                worker.close()
            self._workers.clear()
        self._drop_async_client()

    def __enter__(self) -> MuseTalkClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _named_model(client: MuseTalkClient, call: Callable) -> str | None:
    """The model of `call` if it is one of `client`'s named calls (client.musetalk...)."""
    if getattr(call, "__self__", None) is not client:
        return None
    name = getattr(call, "__name__", "")
    return name if name in specs.MODELS else None


class _Cancellable(Future):
    """The Future of a request sent with gRPC's asynchronous call, in one or more parts:
    `cancel()` cancels every part on the server too, until the answer has arrived."""

    def __init__(self, parts: int, deadlines: Deadlines):
        super().__init__()
        self.contexts: list = []  # tritonclient's CallContext per part
        self.tickets: list[Ticket] = []
        self._deadlines = deadlines
        self._parts: list = [None] * parts
        self._missing = parts
        self._guard = threading.Lock()

    def cancel(self) -> bool:
        if not super().cancel():
            return False
        for context in self.contexts:
            context.cancel()
        for ticket in self.tickets:
            self._deadlines.finish(ticket, answered=False)
        return True

    def part_done(self, index: int, output: np.ndarray) -> None:
        with self._guard:
            self._parts[index] = output
            self._missing -= 1
            if self._missing:
                return
        self._settle(self.set_result, self._parts[0] if len(self._parts) == 1 else np.concatenate(self._parts))

    def part_failed(self, error: BaseException) -> None:
        self._settle(self.set_exception, error)

    @staticmethod
    def _settle(setter, value) -> None:
        try:
            setter(value)
        except InvalidStateError:
            pass  # cancelled meanwhile (the server then answers CANCELLED), or an earlier part failed


def _close_quietly(client) -> None:
    try:
        client.close()
    except Exception:  # noqa: BLE001 - closing a dead connection is fine
        pass


class _Worker:
    """One thread's connection, and its shared-memory regions per model."""

    def __init__(self, client):
        self.client = client
        self.arenas: dict[str, SharedMemoryArena] = {}

    def arena(self, spec: specs.ModelSpec) -> SharedMemoryArena:
        if spec.name not in self.arenas:
            self.arenas[spec.name] = SharedMemoryArena(self.client, spec)
        return self.arenas[spec.name]

    def close(self) -> None:
        for arena in self.arenas.values():
            arena.close()
        _close_quietly(self.client)
