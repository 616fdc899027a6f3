"""The ways of running one network that benchmarks.onnx_vs_pytorch compares.

A backend is bound to one batch of inputs before it is timed (`Backend.bind`). On a GPU the
inputs are copied to the device there, once, so a timed call measures the network alone, as
in a server that keeps tensors on the device between steps. A bound call returns when its
work is done (the device synchronised); `outputs()` brings the last call's outputs back to
the host, outside the timing.

  pytorch(...)              PyTorch eager: fp32, TF32, autocast, fp16, the export's rewrites,
                            replay as a CUDA graph
  on_host(...)              any runner of contract.runners, numpy in and out (the CPU rows)
  OnnxruntimeOnDevice(...)  onnxruntime with I/O binding: inputs and outputs bound once on the
                            device; on CUDA, TF32 on or off, and replay as a CUDA graph
"""
from __future__ import annotations

import copy
import itertools
from collections.abc import Callable
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch


class Bound:
    """One backend bound to one batch: call it to run once; `outputs()` answers the last run's."""

    def __init__(self, call: Callable[[], None], fetch: Callable[[], list[np.ndarray]], *keep):
        self._call, self._fetch = call, fetch
        self._keep = keep  # device buffers the bound call reads and writes: alive as long as it is

    def __call__(self) -> None:
        self._call()

    def outputs(self) -> list[np.ndarray]:
        return self._fetch()


@dataclass
class Backend:
    name: str
    bind: Callable[[list[np.ndarray]], Bound]


def on_host(name: str, run: Callable[[list[np.ndarray]], list[np.ndarray]]) -> Backend:
    """A backend that takes numpy inputs and answers numpy outputs on every call."""
    def bind(inputs):
        last = []

        def call():
            last[:] = [run(inputs)]

        return Bound(call, lambda: last[0])

    return Backend(name, bind)


def pytorch(name: str, module, device: str = "cpu", *, half: bool = False,
            autocast: torch.dtype | None = None, tf32: bool = False, rewrites: tuple = (),
            graph: bool = False) -> Backend:
    """PyTorch eager: strict fp32 by default; or TF32 tensor cores, autocast to a dtype
    (norms stay fp32), the whole module in fp16, the export's exact rewrites, and
    replay as a CUDA graph (no per-kernel launch cost, as in a built engine)."""
    if half or rewrites:  # a copy: the fp32 backends keep the original
        module = copy.deepcopy(module)
    # The rewrites undo themselves when their context closes, which garbage collection of
    # the stack would do: every bound call holds it open.
    applied = ExitStack()
    for rewrite in rewrites:
        applied.enter_context(rewrite(module))
    module = (module.half() if half else module).to(device)
    forward = _graphed(module) if graph else module

    def bind(inputs):
        tensors = [torch.from_numpy(x).to(device) for x in inputs]
        if half:
            tensors = [t.half() if t.is_floating_point() else t for t in tensors]
        last = []

        def call():
            with torch.no_grad(), _tf32(tf32), torch.autocast(device, dtype=autocast or torch.bfloat16,
                                                              enabled=autocast is not None):
                out = forward(*tensors)
            if device == "cuda":
                torch.cuda.synchronize()
            last[:] = list(out) if isinstance(out, tuple) else [out]

        def fetch():
            return [o.float().cpu().numpy() if o.is_floating_point() else o.cpu().numpy() for o in last]

        return Bound(call, fetch, applied, tensors)

    return Backend(name, bind)


def _graphed(module) -> Callable:
    """`module` captured as one CUDA graph per input shape, replayed on static tensors."""
    graphs = {}

    def forward(*tensors):
        shapes = tuple(t.shape for t in tensors)
        if shapes not in graphs:
            static = [t.clone() for t in tensors]
            side = torch.cuda.Stream()  # warm-up off the default stream, as capture requires
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(3):
                    module(*static)
            torch.cuda.current_stream().wait_stream(side)
            cuda_graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(cuda_graph):
                out = module(*static)
            graphs[shapes] = cuda_graph, static, out
        cuda_graph, static, out = graphs[shapes]
        for target, value in zip(static, tensors):
            target.copy_(value)
        cuda_graph.replay()
        return out.clone()

    return forward


@contextmanager
def _tf32(enabled: bool):
    """TF32 for matmuls and convolutions on or off (PyTorch's default has convolutions on)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


# onnxruntime's tensor types, as torch allocates them and as I/O binding names them.
_TYPES = {"tensor(float)": (torch.float32, np.float32), "tensor(float16)": (torch.float16, np.float16),
          "tensor(uint8)": (torch.uint8, np.uint8), "tensor(int64)": (torch.int64, np.int64)}


class OnnxruntimeOnDevice:
    """One onnxruntime session on `device` ("cuda" or "cpu") whose inputs and outputs are bound
    once per batch (I/O binding): no copy between host and device inside a timed call.

    On CUDA the session is made with `enable_cuda_graph`, so that the same session serves two
    backends: `backend(graph=False)` runs it operator by operator, `backend(graph=True)`
    captures each batch's run as a CUDA graph and replays it. Where the graph cannot be made
    (onnxruntime refuses graphs with compute on the CPU), `graph_refused` says why and the
    session runs without it.
    """

    def __init__(self, path: Path, device: str = "cuda", tf32: bool = False, tensorrt: dict | None = None):
        import onnxruntime as ort

        self.device = device
        self.graph_refused = "" if device == "cuda" else "CUDA graphs need the CUDA provider"
        self._graph_ids = itertools.count()
        options = ort.SessionOptions()
        if device == "cpu":
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            return
        cuda = {"device_id": "0", "use_tf32": "1" if tf32 else "0"}
        if tensorrt is not None:  # TensorRT's engine, CUDA for what it leaves; its own graphs are not asked for
            self.graph_refused = "not measured with TensorRT"
            self.session = ort.InferenceSession(str(path), options, providers=[
                ("TensorrtExecutionProvider", tensorrt), ("CUDAExecutionProvider", cuda)])
            if self.session.get_providers()[0] != "TensorrtExecutionProvider":  # it fell back, quietly
                raise RuntimeError(f"TensorRT is not usable here (onnxruntime offered {self.session.get_providers()})")
            return
        try:
            self.session = ort.InferenceSession(
                str(path), options, providers=[("CUDAExecutionProvider", {**cuda, "enable_cuda_graph": "1"})])
        except Exception as refused:  # noqa: BLE001 - onnxruntime's own exception types
            self.graph_refused = str(refused).splitlines()[0]
            self.session = ort.InferenceSession(str(path), options,
                                                providers=[("CUDAExecutionProvider", cuda)])
        if "CUDAExecutionProvider" not in self.session.get_providers():
            raise RuntimeError(f"onnxruntime could not use CUDA for {path}: {self.session.get_providers()}")

    def backend(self, name: str, graph: bool = False) -> Backend:
        def bind(inputs):
            if graph and self.graph_refused:
                raise RuntimeError(f"no CUDA graph: {self.graph_refused}")
            return self._bind(inputs, graph)

        return Backend(name, bind)

    def _bind(self, inputs: list[np.ndarray], graph: bool) -> Bound:
        import onnxruntime as ort

        batch = inputs[0].shape[0]
        binding = self.session.io_binding()
        feeds = [torch.from_numpy(np.ascontiguousarray(x)).to(self.device) for x in inputs]
        for meta, tensor, array in zip(self.session.get_inputs(), feeds, inputs):
            binding.bind_input(meta.name, self.device, 0, array.dtype.type, list(tensor.shape), tensor.data_ptr())
        results = []
        for meta in self.session.get_outputs():
            torch_type, numpy_type = _TYPES[meta.type]
            shape = [d if isinstance(d, int) else batch for d in meta.shape]  # the batch is the one free dim
            results.append(torch.empty(shape, dtype=torch_type, device=self.device))
            binding.bind_output(meta.name, self.device, 0, numpy_type, shape, results[-1].data_ptr())
        run_options = ort.RunOptions()
        if self.device == "cuda":  # -1: this run is not captured; n: graph n, captured once, then replayed
            run_options.add_run_config_entry("gpu_graph_id", str(next(self._graph_ids) if graph else -1))

        def call():
            self.session.run_with_iobinding(binding, run_options)
            binding.synchronize_outputs()

        if graph:  # onnxruntime runs plainly (allocating) before it captures: all before any timing
            for _ in range(3):
                call()
        return Bound(call, lambda: [t.cpu().numpy() for t in results], binding, feeds, results)
