"""System shared memory for tensors, when client and server share a host.

Large tensors (a batch of 32 faces is 6 MB) then cross by memory instead of
the socket. One arena holds one region per input and output of a model, sized
for its max batch, registered once with the server and reused by every request
of the thread that owns it.
"""
from __future__ import annotations

import os
import uuid

import numpy as np
import tritonclient.utils.shared_memory as shm
from tritonclient.utils import triton_to_np_dtype

from contract import specs


class SharedMemoryArena:
    def __init__(self, client, spec: specs.ModelSpec):
        self.client = client
        self.spec = spec
        self.regions: dict[str, tuple[str, object, int]] = {}
        tag = f"{spec.name}_{os.getpid()}_{uuid.uuid4().hex[:8]}"
        for tensor in (*spec.inputs, *spec.outputs):
            size = spec.max_batch_size * int(np.prod(tensor.shape)) * np.dtype(tensor.dtype).itemsize
            name = f"musetalk_{tag}_{tensor.name}"
            handle = shm.create_shared_memory_region(name, f"/{name}", size)
            self.regions[tensor.name] = (name, handle, size)
            client.register_system_shared_memory(name, f"/{name}", size)

    def put(self, infer_input, name: str, array: np.ndarray) -> None:
        region, handle, _ = self.regions[name]
        shm.set_shared_memory_region(handle, [array])
        infer_input.set_shared_memory(region, array.nbytes)

    def receive(self, requested_output, name: str, batch: int) -> None:
        region, _, _ = self.regions[name]
        tensor = self.spec.output(name)
        nbytes = batch * int(np.prod(tensor.shape)) * np.dtype(tensor.dtype).itemsize
        requested_output.set_shared_memory(region, nbytes)

    def read(self, name: str, result) -> np.ndarray:
        _, handle, _ = self.regions[name]
        meta = result.get_output(name)
        shape = list(meta.shape if hasattr(meta, "shape") and not isinstance(meta, dict) else meta["shape"])
        datatype = meta.datatype if hasattr(meta, "datatype") else meta["datatype"]
        # Copy: the region is overwritten by this thread's next request.
        return np.array(shm.get_contents_as_numpy(handle, triton_to_np_dtype(datatype), shape))

    def close(self) -> None:
        for region, handle, _ in self.regions.values():
            try:
                self.client.unregister_system_shared_memory(region)
            except Exception:  # noqa: BLE001 - the server may be gone already
                pass
            shm.destroy_shared_memory_region(handle)
        self.regions.clear()
