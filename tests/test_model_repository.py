"""model_repository/: every config parses as Triton's ModelConfig and agrees with the specs."""
from __future__ import annotations

import onnx
import pytest
from tritonclient.grpc import model_config_pb2 as mc

from contract import specs
from contract.layout import model_path
from support import ROOT
from triton_local.repository import Runtime, local_config, source_configs

CONFIGS = source_configs(ROOT / "model_repository")
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
            [(t.name, mc.DataType.Value(t.triton_dtype), t.shape) for t in tensors]


@pytest.mark.parametrize("name", list(specs.NETWORKS))
def test_networks_batch_dynamically_on_the_gpu(name):
    config = CONFIGS[name]
    assert config.backend == "onnxruntime"
    assert config.HasField("dynamic_batching")
    assert [g.kind for g in config.instance_group] == [mc.ModelInstanceGroup.KIND_GPU]


def _tensorrt(config):
    accelerators = config.optimization.execution_accelerators.gpu_execution_accelerator
    return {a.name: dict(a.parameters) for a in accelerators}.get("tensorrt")


def profile_shapes(spec: specs.ModelSpec, batch: int) -> str:
    """A TensorRT optimisation-profile shape list, as onnxruntime's TensorRT provider reads it."""
    return ",".join(f"{t.name}:{'x'.join(map(str, (batch, *t.shape)))}" for t in spec.inputs)


ACCELERATED = [name for name in specs.NETWORKS if _tensorrt(CONFIGS[name])]


def test_the_per_frame_networks_use_tensorrt():
    assert sorted(ACCELERATED) == ["unet", "vae_decoder"]


@pytest.mark.parametrize("name", ACCELERATED)
def test_tensorrt_profile_and_warmup_follow_the_contract(name):
    """One profile from batch 1 to the max batch, optimised at the smallest preferred batch
    (the front end's default), built during warm-up at the max batch with every input of
    the contract: no request shape can trigger an engine build at serving time."""
    config, spec = CONFIGS[name], specs.NETWORKS[name]
    trt = _tensorrt(config)
    assert trt["trt_profile_min_shapes"] == profile_shapes(spec, 1)
    assert trt["trt_profile_opt_shapes"] == profile_shapes(spec, min(config.dynamic_batching.preferred_batch_size))
    assert trt["trt_profile_max_shapes"] == profile_shapes(spec, spec.max_batch_size)
    assert trt["trt_engine_cache_enable"] == "1" and trt["trt_engine_cache_path"] == f"/cache/trt/{name}"
    assert trt["trt_timing_cache_enable"] == "1" and trt["trt_timing_cache_path"] == "/cache/trt/timing"
    [warmup] = config.model_warmup
    assert warmup.batch_size == spec.max_batch_size
    assert {k: (v.data_type, tuple(v.dims), v.random_data) for k, v in warmup.inputs.items()} == \
        {t.name: (mc.DataType.Value(t.triton_dtype), t.shape, True) for t in spec.inputs}


def test_unet_is_fp16_and_vae_decoder_is_not_reduced_precision():
    assert _tensorrt(CONFIGS["unet"])["precision_mode"] == "FP16"
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
    # warmed at batch 1 (a first inference's costs paid before READY), not at the engines' batch 32
    assert [(w.batch_size, sorted(w.inputs)) for w in local.model_warmup] == \
        [(1, sorted(t.name for t in specs.UNET.inputs))]
    assert local.parameters["runtime"].string_value == "openvino"
    assert local.parameters["precision"].string_value == "bf16"
    for field in ("name", "max_batch_size", "input", "output"):
        assert getattr(local, field) == getattr(original, field)
    # on a CPU an execution takes at most a chunk from the queue, at once: the priorities stay
    batching = local.dynamic_batching
    assert list(batching.preferred_batch_size) == [Runtime().chunk] and batching.max_queue_delay_microseconds == 0
    assert batching.priority_levels == original.dynamic_batching.priority_levels
    assert batching.default_priority_level == original.dynamic_batching.default_priority_level
