"""The reduced-precision gate and the local server's bf16 (OpenVINO) path."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from client import MuseTalkClient
from contract import cpu
from contract.layout import BF16_GATE_KEY, BF16_PSNR_KEY, model_path, read_metadata
from contract.specs import NETWORKS
from export import precision
from export.metadata import stamp
from support import BUILD, frames, local_chain
from triton_local.launch import start
from triton_local.repository import generate
from triton_local.runtimes import BF16, OPENVINO_FP32, REFERENCE, choose, runtimes_for
from triton_local.server import LocalTriton, Ports


def test_export_records_the_gate_in_both_gated_files(tiny_onnx):
    psnr = precision.recorded_psnr(tiny_onnx)
    assert psnr is not None and psnr > 20
    verdict = "pass" if psnr >= precision.GATE_DB else "fail"
    for name in precision.GATED:
        assert read_metadata(model_path(tiny_onnx, name))[BF16_GATE_KEY] == verdict
    assert BF16_GATE_KEY not in read_metadata(model_path(tiny_onnx, "audio_encoder"))


def gated_copy(tiny_onnx, tmp_path, verdict: str) -> Path:
    repository = tmp_path / "onnx"
    shutil.copytree(tiny_onnx, repository)
    for name in precision.GATED:
        stamp(model_path(repository, name), {BF16_GATE_KEY: verdict})
    return repository


@pytest.mark.parametrize("verdict", ["pass", "fail"])
def test_bf16_needs_the_gate_and_a_cpu_that_runs_it(tiny_onnx, tmp_path, monkeypatch, verdict):
    """The local server reads the verdict from the files, never the exporter's code, and asks
    the CPU: bf16 only where both say yes; MUSETALK_CPU_PRECISION forces either way."""
    repository = gated_copy(tiny_onnx, tmp_path, verdict)
    with_bf16, without = {"FP32", "BF16", "INT8"}, {"FP32", "INT8"}
    gated = {n: BF16 for n in precision.GATED} if verdict == "pass" else {}
    assert runtimes_for(repository, capabilities=with_bf16) == \
        {**{n: REFERENCE for n in NETWORKS}, "audio_encoder": OPENVINO_FP32, **gated}
    assert {n: runtimes_for(repository, capabilities=without)[n] for n in precision.GATED} == \
        {n: REFERENCE for n in precision.GATED}  # no native bf16: fp32, whatever the gate says
    why = choose(repository, capabilities=without)["unet"].why
    assert why == ("fp32 (bf16 gated but this CPU has no native bf16)" if verdict == "pass"
                   else f"fp32 (bf16 failed its gate: {read_metadata(model_path(repository, 'unet'))[BF16_PSNR_KEY]}"
                        " dB face PSNR)")
    forced = runtimes_for(repository, precision="bf16", capabilities=without)
    assert {n: forced[n] for n in precision.GATED} == ({n: BF16 for n in precision.GATED} if verdict == "pass"
                                                       else {n: REFERENCE for n in precision.GATED})
    monkeypatch.setenv("MUSETALK_CPU_PRECISION", "fp32")
    assert runtimes_for(repository, capabilities=with_bf16) == {n: REFERENCE for n in NETWORKS}
    monkeypatch.setenv("MUSETALK_CPU_PRECISION", "fast")
    with pytest.raises(ValueError, match="MUSETALK_CPU_PRECISION"):
        choose(repository)


def test_a_cpu_without_bf16_is_served_in_fp32(tiny_onnx, tmp_path, monkeypatch, capsys):
    """The real server, started the way make serve starts it, on a CPU that says it has no bf16
    (MUSETALK_CPU_CAPABILITIES), with files whose gate passed: it serves unet and vae_decoder
    in fp32 onnxruntime, and its startup line says why."""
    repository = gated_copy(tiny_onnx, tmp_path, "pass")
    monkeypatch.setenv("MUSETALK_CPU_CAPABILITIES", "FP32,INT8")
    server = start(repository, Ports.free(), BUILD / "triton_repository_no_bf16", progress=False)
    try:
        with MuseTalkClient(server.grpc_url) as client:
            for name in precision.GATED:
                parameters = client.model_config(name)["parameters"]
                assert (parameters["runtime"]["string_value"], parameters["precision"]["string_value"]) == \
                    ("onnxruntime", "f32")
            audio, latents = frames(2, seed=5)
            assert np.array_equal(client.musetalk(audio, latents), local_chain(repository, audio, latents))
    finally:
        server.stop()
    startup = capsys.readouterr().out
    assert "unet: fp32 (bf16 gated but this CPU has no native bf16)" in startup
    assert "vae_decoder: fp32 (bf16 gated but this CPU has no native bf16)" in startup


def test_gate_measures_what_it_claims(tiny_onnx):
    assert abs(precision.measure_bf16_core(tiny_onnx) - precision.recorded_psnr(tiny_onnx)) < 0.5


def test_server_runs_the_core_in_openvino_bf16(tiny_onnx):
    """The python backend's OpenVINO path serves the ensemble within the gate's PSNR (on a CPU
    without native bf16, OpenVINO emulates it: slowly for the full models, quickly for these)."""
    repository = BUILD / "triton_repository_bf16"
    generate(repository, tiny_onnx, {n: BF16 for n in precision.GATED})
    audio, latents = frames(4, seed=3)
    with LocalTriton(repository, Ports.free(), log_file=BUILD / "triton-bf16.log") as server, \
            MuseTalkClient(server.grpc_url) as client:
        faces = client.musetalk(audio, latents)
    reference = local_chain(tiny_onnx, audio, latents)
    psnr = precision.face_psnr(reference, faces)
    assert faces.shape == reference.shape
    assert psnr >= precision.GATE_DB
    if "BF16" in cpu.capabilities():
        assert not np.array_equal(faces, reference)  # bf16 really ran
