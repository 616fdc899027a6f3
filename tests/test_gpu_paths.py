"""What runs on a GPU, checked here where there is none: the fp16 copies of the ONNX files,
the benchmark's backends bound to their inputs, and the local server asked for CUDA.

The fp16 files and the I/O binding run for real on onnxruntime's CPU provider; the CUDA
provider itself only runs on a GPU host (python -m benchmarks.cuda_host).
"""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from benchmarks.backends import OnnxruntimeOnDevice, on_host, pytorch
from benchmarks.onnx_vs_pytorch import measure
from contract.layout import model_path
from contract.specs import NETWORKS
from export.checkpoints import WeightSource
from export.fp16 import NORMALISATIONS, to_fp16
from export.onnx_configs import CONFIGS
from export.precision import face_psnr
from support import BUILD
from triton_local.launch import start
from triton_local.runtimes import CUDA, choose, describe
from triton_local.server import Ports, ServerError


def chain(repository, seed: int = 3):
    """unet -> vae_decoder on onnxruntime's CPU provider: (predicted latents, faces)."""
    rng = np.random.default_rng(seed)
    feeds = {"latents": rng.standard_normal((2, 8, 32, 32)).astype(np.float32),
             "audio_embedding": rng.standard_normal((2, 50, 384)).astype(np.float32)}
    pred = ort.InferenceSession(str(model_path(repository, "unet"))).run(None, feeds)[0]
    face = ort.InferenceSession(str(model_path(repository, "vae_decoder"))).run(None, {"pred_latents": pred})[0]
    return pred, face


def test_fp16_copies_keep_the_contract_and_the_face(tiny_onnx, tmp_path):
    """Weights in fp16, inputs and outputs as the contract says, normalisations computed in
    fp32 between casts; the decoded face stays within 45 dB of the fp32 chain's."""
    for name in ("unet", "vae_decoder"):
        copy = to_fp16(model_path(tiny_onnx, name), model_path(tmp_path, name))
        model = onnx.load(str(copy))
        assert {i.data_type for i in model.graph.initializer if i.data_type in (1, 10)} == {10}  # FLOAT16 only
        session = ort.InferenceSession(str(copy))
        assert [(t.name, t.type) for t in session.get_inputs() + session.get_outputs()] == \
            [(t.name, {"float32": "tensor(float)", "uint8": "tensor(uint8)"}[t.dtype])
             for t in NETWORKS[name].inputs + NETWORKS[name].outputs]
        norms = [n for n in model.graph.node if n.op_type in NORMALISATIONS]
        assert norms, f"{name} has no normalisation to keep in fp32"
        produced_by = {out: node for node in model.graph.node for out in node.output}
        for norm in norms:  # fed by a cast to fp32 (onnx.TensorProto.FLOAT)
            cast = produced_by[norm.input[0]]
            assert cast.op_type == "Cast" and cast.attribute[0].i == onnx.TensorProto.FLOAT
    pred32, face32 = chain(tiny_onnx)
    pred16, face16 = chain(tmp_path)
    assert np.linalg.norm(pred16 - pred32) / np.linalg.norm(pred32) < 1e-2
    assert face_psnr(face32, face16) > 45


def test_fp16_copies_are_remade_only_when_their_source_or_choice_changes(tiny_onnx, tmp_path):
    source, target = model_path(tiny_onnx, "vae_decoder"), model_path(tmp_path, "vae_decoder")
    to_fp16(source, target)
    made = target.stat().st_mtime_ns
    to_fp16(source, target)
    assert target.stat().st_mtime_ns == made
    to_fp16(source, target, keep_fp32=())  # every operator in fp16: another file
    assert target.stat().st_mtime_ns != made
    model = onnx.load(str(target))
    assert not [n for n in model.graph.node if n.op_type == "Cast" and n.output[0] in
                {i for m in model.graph.node if m.op_type in NORMALISATIONS for i in m.input}]
    target.write_bytes(b"half-written")  # a copy cut short is made again
    to_fp16(source, target)
    assert ort.InferenceSession(str(target)).get_outputs()[0].name == "face"


def test_io_binding_runs_what_the_plain_session_runs(tiny_onnx):
    """The benchmark's onnxruntime backend binds its inputs and outputs once, then runs: here
    on the CPU, the same code a GPU runs with device "cuda"."""
    path = model_path(tiny_onnx, "unet")
    rng = np.random.default_rng(0)
    inputs = [rng.standard_normal((3, 8, 32, 32)).astype(np.float32),
              rng.standard_normal((3, 50, 384)).astype(np.float32)]
    expected = ort.InferenceSession(str(path)).run(None, dict(zip(["latents", "audio_embedding"], inputs)))[0]
    on_device = OnnxruntimeOnDevice(path, device="cpu")
    bound = on_device.backend("onnxruntime-cpu-bound").bind(inputs)
    bound()
    bound()
    np.testing.assert_allclose(bound.outputs()[0], expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(RuntimeError, match="CUDA graph"):
        on_device.backend("graph", graph=True).bind(inputs)


def test_the_benchmark_measures_every_backend_bound_once_per_batch(tiny_onnx):
    rows = measure("vae_decoder", WeightSource(None, "tiny"), tiny_onnx, [1, 2], repeats=1, cuda=False)
    assert {(r["backend"], r["batch"]) for r in rows} == {
        (b, n) for b in ("pytorch-fp32", "pytorch-bf16", "onnxruntime-fp32", "openvino-fp32", "openvino-bf16")
        for n in (1, 2)}
    exact = [r for r in rows if r["backend"] in ("onnxruntime-fp32", "openvino-fp32")]
    assert all(r["face_psnr_db"] > 60 for r in exact)  # the exported maths, against PyTorch's
    assert all(r["ms_per_call"] > 0 for r in rows)


def test_backends_run_on_numpy_or_bound_tensors_alike():
    config = CONFIGS["positional_encoding"]
    module = config.build(None).eval()
    inputs = [t.numpy() for t in config.sample(2, torch.Generator().manual_seed(0))]
    eager = pytorch("pytorch-fp32", module).bind(inputs)
    eager()
    plain = on_host("plain", lambda arrays: [module(*map(torch.from_numpy, arrays)).detach().numpy()])
    host = plain.bind(inputs)
    host()
    np.testing.assert_array_equal(eager.outputs()[0], host.outputs()[0])


def test_the_local_server_runs_every_model_on_cuda_when_asked(tiny_onnx, monkeypatch):
    choices = choose(tiny_onnx, device="cuda")
    assert {n: c.runtime for n, c in choices.items()} == {n: CUDA for n in NETWORKS}
    assert CUDA.chunk == 0  # a GPU takes the whole batch at once
    assert describe(choices).startswith("on the GPU:")
    monkeypatch.setenv("MUSETALK_LOCAL_DEVICE", "tpu")
    with pytest.raises(ValueError, match="MUSETALK_LOCAL_DEVICE"):
        choose(tiny_onnx)


def test_asked_for_a_gpu_where_none_is_the_server_says_why(tiny_onnx, monkeypatch):
    """No quiet fall-back to the CPU: the models fail to load, naming what onnxruntime lacked."""
    monkeypatch.setenv("MUSETALK_LOCAL_DEVICE", "cuda")
    with pytest.raises(ServerError, match="onnxruntime could not use CUDA"):
        start(tiny_onnx, Ports.free(), BUILD / "triton_repository_cuda", progress=False)


def test_a_gpu_the_server_environment_cannot_use_leaves_the_models_on_the_cpu(tiny_onnx, monkeypatch):
    """`auto` with a GPU in sight probes the server environment for real (here its onnxruntime-gpu
    finds no CUDA libraries): the models stay on the CPU and the startup lines say why, once."""
    from triton_local import runtimes

    monkeypatch.setattr(runtimes, "gpu_visible", lambda: True)  # this machine has none to see
    choices = choose(tiny_onnx)
    assert all(c.runtime != CUDA for c in choices.values())
    lines = describe(choices).splitlines()
    (why,) = [line for line in lines if "not on the GPU" in line]
    assert "onnxruntime-gpu[cuda,cudnn]" in why and "MUSETALK_LOCAL_DEVICE=cpu" in why
