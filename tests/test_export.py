"""python -m export: tiny-profile exports, the parity gate, skipping, ONNX contracts."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from contract import specs
from contract.layout import EXPORT_KEY, model_path
from export.checkpoints import WeightSource
from export.onnx_configs import CONFIGS, Tolerance
from export.onnx_export import ParityError, export_network
from support import ROOT

ONNX_DTYPES = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.UINT8: "uint8"}


def run_export(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "export", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)


def test_cli_exports_all_five_then_skips_then_forces(tmp_path):
    repo = tmp_path / "repo"
    first = run_export("--synthetic", "--profile", "tiny", "--repository", str(repo))
    assert first.returncode == 0, first.stderr
    assert "SYNTHETIC WEIGHTS" in first.stdout
    for name in CONFIGS:
        assert model_path(repo, name).is_file()
        assert f"] {name}: done in" in first.stdout
        assert f"parity {name}." in first.stdout
    assert (repo / "unet" / "1" / "model.onnx.data").is_file()  # the UNet keeps external data

    again = run_export("--synthetic", "--profile", "tiny", "--repository", str(repo))
    assert again.returncode == 0 and again.stdout.count("up to date, skipped") == 5

    forced = run_export("--synthetic", "--profile", "tiny", "--repository", str(repo),
                        "--models", "unet", "--force")
    assert forced.returncode == 0 and "] unet: done in" in forced.stdout
    assert "skipped" not in forced.stdout


def test_cli_rejects_unknown_models_and_missing_weights(tmp_path):
    bad = run_export("--synthetic", "--models", "unet,vae")
    assert bad.returncode != 0 and "unknown model(s) vae" in bad.stderr
    missing = run_export("--weights", str(tmp_path / "nowhere"), "--repository", str(tmp_path / "r"),
                         "--models", "unet")
    assert missing.returncode == 1
    assert "musetalkV15/musetalk.json" in missing.stderr and "huggingface-cli download" in missing.stderr


@pytest.mark.parametrize("name", list(CONFIGS))
def test_onnx_contract_matches_specs_and_runs_at_any_batch(tiny_onnx, name):
    path = model_path(tiny_onnx, name)
    model = onnx.load(str(path), load_external_data=False)
    spec = specs.NETWORKS[name]
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["musetalk.synthetic"] == "true" and EXPORT_KEY in meta
    for declared, graph in ((spec.inputs, model.graph.input), (spec.outputs, model.graph.output)):
        assert [t.name for t in declared] == [g.name for g in graph]
        for tensor, g in zip(declared, graph):
            dims = g.type.tensor_type.shape.dim
            assert dims[0].dim_param and not dims[0].dim_value, "batch must be dynamic"
            assert tuple(d.dim_value for d in dims[1:]) == tensor.shape
            assert ONNX_DTYPES[g.type.tensor_type.elem_type] == tensor.dtype

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (1, 4):
        feeds = {t.name: _random(t, batch) for t in spec.inputs}
        outputs = session.run(None, feeds)
        for tensor, out in zip(spec.outputs, outputs):
            assert out.shape == (batch, *tensor.shape) and out.dtype == np.dtype(tensor.dtype)


def _random(tensor, batch):
    rng = np.random.default_rng(0)
    if tensor.dtype == "uint8":
        return rng.integers(0, 256, (batch, *tensor.shape), dtype=np.uint8)
    return rng.standard_normal((batch, *tensor.shape)).astype(np.float32)


def test_parity_gate_fails_and_writes_nothing(tmp_path):
    """A tolerance of zero cannot be met by fp32 reordering: the gate must refuse."""
    strict = CONFIGS["unet"].__class__(**{**CONFIGS["unet"].__dict__, "tolerance": Tolerance(rel_l2=0.0)})
    source = WeightSource(None, "tiny")
    with pytest.raises(ParityError, match="disagrees with PyTorch"):
        export_network(strict, source, tmp_path)
    assert not model_path(tmp_path, "unet").exists()
    assert not any((tmp_path / "unet" / "1").iterdir())  # no staging leftovers either


def test_parity_gate_catches_a_wrong_graph(tiny_onnx):
    """The parity check compares against PyTorch for real: other weights fail it."""
    from export.onnx_export import check_parity

    config = CONFIGS["vae_decoder"]
    other = config.build(WeightSource(None, "tiny", seed=1).load("vae"))
    report = check_parity(config, other, model_path(tiny_onnx, "vae_decoder"))
    assert not report.passed


def test_unet_has_timestep_zero_baked_in(tiny_onnx):
    """The graph has no timestep input, and computes unet(x, t=0, audio)."""
    unet = WeightSource(None, "tiny").load("unet")
    latents, audio = (torch.randn(2, *t.shape) for t in specs.UNET.inputs)
    with torch.no_grad():
        expected = unet(latents, 0, encoder_hidden_states=audio).sample.numpy()
    session = ort.InferenceSession(str(model_path(tiny_onnx, "unet")), providers=["CPUExecutionProvider"])
    got = session.run(None, {"latents": latents.numpy(), "audio_embedding": audio.numpy()})[0]
    assert [i.name for i in session.get_inputs()] == ["latents", "audio_embedding"]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_subpixel_upsample_computes_nearest_upsample_then_conv():
    from diffusers.models.upsampling import Upsample2D

    from export.rewrites import SubpixelUpsample, subpixel_upsampling

    torch.manual_seed(0)
    upsample = Upsample2D(16, use_conv=True, out_channels=24).eval()
    x = torch.randn(2, 16, 7, 9)  # odd sizes: every border phase is exercised
    with torch.no_grad():
        expected, got = upsample(x), SubpixelUpsample(upsample)(x)
    assert got.shape == expected.shape == (2, 24, 14, 18)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)

    holder = torch.nn.Sequential(upsample)
    with subpixel_upsampling(holder):
        assert isinstance(holder[0], SubpixelUpsample)
    assert holder[0] is upsample  # restored after export


@pytest.mark.parametrize("name", ["unet", "vae_decoder"])
def test_upsampling_ships_as_subpixel_convs(tiny_onnx, name):
    graph = onnx.load(str(model_path(tiny_onnx, name)), load_external_data=False).graph
    assert not [n for n in graph.node if n.op_type == "Resize"]
