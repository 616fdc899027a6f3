"""The reduced-precision gate and the local server's bf16 (OpenVINO) path."""
from __future__ import annotations

import shutil

import numpy as np
import pytest

from client import MuseTalkClient
from contract.layout import BF16_GATE_KEY, model_path, read_metadata
from export import precision
from export.metadata import stamp
from support import BUILD, frames, local_chain
from triton_local.repository import generate
from triton_local.runtimes import BF16, OPENVINO_FP32, runtimes_for
from triton_local.server import LocalTriton, Ports


def test_export_records_the_gate_in_both_gated_files(tiny_onnx):
    psnr = precision.recorded_psnr(tiny_onnx)
    assert psnr is not None and psnr > 20
    verdict = "pass" if psnr >= precision.GATE_DB else "fail"
    for name in precision.GATED:
        assert read_metadata(model_path(tiny_onnx, name))[BF16_GATE_KEY] == verdict
    assert BF16_GATE_KEY not in read_metadata(model_path(tiny_onnx, "audio_encoder"))


@pytest.mark.parametrize("verdict", ["pass", "fail"])
def test_server_runtimes_follow_the_recorded_verdict(tiny_onnx, tmp_path, monkeypatch, verdict):
    """The local server reads the verdict from the files, never the exporter's code."""
    repository = tmp_path / "onnx"
    shutil.copytree(tiny_onnx, repository)
    for name in precision.GATED:
        stamp(model_path(repository, name), {BF16_GATE_KEY: verdict})
    gated = {n: BF16 for n in precision.GATED} if verdict == "pass" else {}
    assert runtimes_for(repository) == {"audio_encoder": OPENVINO_FP32, **gated}
    monkeypatch.setenv("MUSETALK_CPU_PRECISION", "fp32")
    assert runtimes_for(repository) == {}
    monkeypatch.delenv("MUSETALK_CPU_PRECISION")
    assert runtimes_for(tmp_path / "nothing") == {"audio_encoder": OPENVINO_FP32}  # nothing gated


def test_gate_measures_what_it_claims(tiny_onnx):
    assert abs(precision.measure_bf16_core(tiny_onnx) - precision.recorded_psnr(tiny_onnx)) < 0.5


def test_server_runs_the_core_in_openvino_bf16(tiny_onnx):
    """The python backend's OpenVINO path serves the ensemble within the gate's PSNR."""
    repository = BUILD / "triton_repository_bf16"
    generate(repository, tiny_onnx, {n: BF16 for n in precision.GATED})
    audio, latents = frames(4, seed=3)
    with LocalTriton(repository, Ports.free(), log_file=BUILD / "triton-bf16.log") as server, \
            MuseTalkClient(server.grpc_url) as client:
        faces = client.musetalk(audio, latents)
    reference = local_chain(tiny_onnx, audio, latents)
    psnr = precision.face_psnr(reference, faces)
    assert faces.shape == reference.shape
    assert psnr >= precision.GATE_DB and not np.array_equal(faces, reference)  # bf16 really ran
