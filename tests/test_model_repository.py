"""model_repository/: every config parses as Triton's ModelConfig and agrees with the specs."""
from __future__ import annotations

import onnx
import pytest
from tritonclient.grpc import model_config_pb2 as mc

from client import specs
from conftest import ROOT
from export.onnx_export import model_path
from triton_local.repository import Runtime, local_config, source_configs

CONFIGS = source_configs(ROOT / "model_repository")
DTYPES = {"float32": mc.TYPE_FP32, "uint8": mc.TYPE_UINT8}
ONNX_DTYPES = {mc.TYPE_FP32: onnx.TensorProto.FLOAT, mc.TYPE_UINT8: onnx.TensorProto.UINT8}


def test_one_folder_per_model_with_a_version_folder():
    assert sorted(CONFIGS) == sorted(specs.MODELS)
    for name in CONFIGS:
        assert (ROOT / "model_repository" / name / "1").is_dir()
        assert CONFIGS[name].name == name


@pytest.mark.parametrize("name", list(specs.MODELS))
def test_config_agrees_with_spec(name):
    config, spec = CONFIGS[name], specs.MODELS[name]
    assert config.max_batch_size == spec.max_batch_size
    for declared, tensors in ((config.input, spec.inputs), (config.output, spec.outputs)):
        assert [(t.name, t.data_type, tuple(t.dims)) for t in declared] == \
            [(t.name, DTYPES[t.dtype], t.shape) for t in tensors]


@pytest.mark.parametrize("name", list(specs.NETWORKS))
def test_networks_batch_dynamically_on_the_gpu(name):
    config = CONFIGS[name]
    assert config.backend == "onnxruntime"
    assert config.HasField("dynamic_batching")
    assert [g.kind for g in config.instance_group] == [mc.ModelInstanceGroup.KIND_GPU]


def _tensorrt(config):
    accelerators = config.optimization.execution_accelerators.gpu_execution_accelerator
    return {a.name: dict(a.parameters) for a in accelerators}.get("tensorrt")


def test_unet_runs_tensorrt_fp16_with_caches_and_warmup():
    trt = _tensorrt(CONFIGS["unet"])
    assert trt["precision_mode"] == "FP16"
    assert trt["trt_engine_cache_enable"] == "1" and trt["trt_engine_cache_path"].startswith("/cache/")
    assert trt["trt_timing_cache_enable"] == "1"
    assert trt["trt_profile_max_shapes"].startswith("latents:32x8x32x32")
    warmup = CONFIGS["unet"].model_warmup[0]
    assert warmup.batch_size == CONFIGS["unet"].max_batch_size
    assert set(warmup.inputs) == {"latents", "audio_embedding"}


def test_vae_decoder_is_not_reduced_precision():
    assert _tensorrt(CONFIGS["vae_decoder"])["precision_mode"] == "FP32"


def test_ensemble_chains_pe_unet_decoder_within_their_batch_limits():
    ensemble = CONFIGS["musetalk"]
    assert ensemble.platform == "ensemble"
    steps = [s.model_name for s in ensemble.ensemble_scheduling.step]
    assert steps == ["positional_encoding", "unet", "vae_decoder"]
    assert ensemble.max_batch_size <= min(CONFIGS[s].max_batch_size for s in steps)
    available = {t.name for t in ensemble.input}
    for step in ensemble.ensemble_scheduling.step:
        model = CONFIGS[step.model_name]
        assert set(step.input_map) == {t.name for t in model.input}
        assert set(step.input_map.values()) <= available
        assert set(step.output_map) == {t.name for t in model.output}
        available |= set(step.output_map.values())
    assert {t.name for t in ensemble.output} <= available


@pytest.mark.parametrize("name", list(specs.NETWORKS))
def test_config_agrees_with_the_exported_onnx(tiny_onnx, name):
    graph = onnx.load(str(model_path(tiny_onnx, name)), load_external_data=False).graph
    config = CONFIGS[name]
    for declared, values in ((config.input, graph.input), (config.output, graph.output)):
        assert [t.name for t in declared] == [v.name for v in values]
        for t, v in zip(declared, values):
            dims = v.type.tensor_type.shape.dim
            assert dims[0].dim_param  # dynamic batch, required with max_batch_size > 0
            assert [d.dim_value for d in dims[1:]] == list(t.dims)
            assert v.type.tensor_type.elem_type == ONNX_DTYPES[t.data_type]


def test_local_config_changes_only_what_a_cpu_needs(tiny_onnx):
    original = CONFIGS["unet"]
    local = local_config(original, model_path(tiny_onnx, "unet"), Runtime("openvino", "bf16"))
    assert local.backend == "python"
    assert [g.kind for g in local.instance_group] == [mc.ModelInstanceGroup.KIND_CPU]
    assert not local.optimization.execution_accelerators.gpu_execution_accelerator
    assert not local.model_warmup
    assert local.parameters["runtime"].string_value == "openvino"
    assert local.parameters["precision"].string_value == "bf16"
    for field in ("name", "max_batch_size", "input", "output", "dynamic_batching"):
        assert getattr(local, field) == getattr(original, field)
