"""The reduced-precision gate and the local server's bf16 (OpenVINO) path."""
from __future__ import annotations

import numpy as np

from client import MuseTalkClient
from export import precision
from test_triton import frames, local_chain
from triton_local.repository import generate
from triton_local.runtimes import BF16, runtimes_for
from triton_local.server import LocalTriton, Ports

from conftest import BUILD


def test_export_records_the_gate_in_both_gated_files(tiny_onnx):
    psnr = precision.recorded_psnr(tiny_onnx)
    assert psnr is not None and psnr > 20
    assert precision.bf16_allowed(tiny_onnx) == (psnr >= precision.GATE_DB)


def test_runtimes_follow_the_gate_and_the_override(tiny_onnx, tmp_path, monkeypatch):
    expected = {n: BF16 for n in precision.GATED} if precision.bf16_allowed(tiny_onnx) else {}
    assert runtimes_for(tiny_onnx) == expected
    monkeypatch.setenv("MUSETALK_CPU_PRECISION", "fp32")
    assert runtimes_for(tiny_onnx) == {}
    monkeypatch.delenv("MUSETALK_CPU_PRECISION")
    assert runtimes_for(tmp_path) == {}  # nothing exported, nothing gated


def test_gate_measures_what_it_claims(tiny_onnx):
    assert abs(precision.measure_bf16_core(tiny_onnx) - precision.recorded_psnr(tiny_onnx)) < 0.5


def test_server_runs_the_core_in_openvino_bf16(tiny_onnx):
    """The python backend's OpenVINO path serves the ensemble within the gate's PSNR."""
    repository = BUILD / "triton_repository_bf16"
    generate(repository, tiny_onnx, {n: BF16 for n in precision.GATED})
    audio, latents = frames(4)
    with LocalTriton(repository, Ports.free(), log_file=BUILD / "triton-bf16.log") as server, \
            MuseTalkClient(server.grpc_url) as client:
        faces = client.musetalk(audio, latents)
    reference = local_chain(tiny_onnx, audio, latents)
    psnr = precision.face_psnr(faces, reference)
    assert faces.shape == reference.shape
    assert psnr >= precision.GATE_DB and not np.array_equal(faces, reference)  # bf16 really ran
