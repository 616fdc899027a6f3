"""The REAL local tritonserver: readiness, the ensemble, batching, the client SDK's errors."""
from __future__ import annotations

import asyncio
import time
from concurrent.futures import CancelledError, ThreadPoolExecutor

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

from client import (
    AsyncMuseTalkClient,
    InvalidInput,
    ModelNotFound,
    MuseTalkClient,
    ServerUnavailable,
)
from client.errors import InferenceFailed, ModelNotReady, translate
from contract import specs
from support import frames, local_chain
from triton_local.server import Ports


def test_every_model_and_the_ensemble_are_ready(triton):
    with MuseTalkClient(triton.grpc_url) as client:
        assert client.server_ready()
        for name in specs.MODELS:
            assert client.model_ready(name), name


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_ensemble_returns_what_onnxruntime_computes(triton, tiny_onnx, protocol):
    audio, latents = frames(5)
    url = triton.grpc_url if protocol == "grpc" else triton.http_url
    with MuseTalkClient(url, protocol) as client:
        faces = client.musetalk(audio, latents)
    assert faces.shape == (5, 256, 256, 3) and faces.dtype == np.uint8
    expected = local_chain(tiny_onnx, audio, latents)
    assert np.abs(faces.astype(int) - expected.astype(int)).max() <= 1


def test_inputs_over_max_batch_are_split_and_kept_in_order(triton, tiny_onnx):
    audio, latents = frames(specs.MUSETALK.max_batch_size + 7)
    with MuseTalkClient(triton.grpc_url, max_in_flight=3) as client:
        faces = client.musetalk(audio, latents)
    expected = local_chain(tiny_onnx, audio, latents)
    assert faces.shape[0] == len(audio)
    assert np.abs(faces.astype(int) - expected.astype(int)).max() <= 1


def test_shared_memory_gives_the_same_answer(triton):
    audio, latents = frames(3)
    with MuseTalkClient(triton.grpc_url) as plain, \
            MuseTalkClient(triton.grpc_url, shared_memory=True) as shm:
        np.testing.assert_array_equal(shm.musetalk(audio, latents), plain.musetalk(audio, latents))
        np.testing.assert_array_equal(shm.unet(latents, audio), plain.unet(latents, audio))


def test_asyncio_client(triton):
    audio, latents = frames(4)

    async def run():
        async with AsyncMuseTalkClient(triton.http_url, "http") as client:
            return await client.musetalk(audio, latents), await client.statistics("unet")

    faces, stats = asyncio.run(run())
    assert faces.shape == (4, 256, 256, 3) and int(stats["inference_count"]) > 0


def test_dynamic_batching_merges_concurrent_requests(triton):
    with MuseTalkClient(triton.grpc_url) as client:
        before = client.statistics("unet")
        audio, latents = frames(1)
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(lambda _: client.musetalk(audio, latents), range(32)))
        after = client.statistics("unet")
    inferences = int(after["inference_count"]) - int(before.get("inference_count", 0))
    executions = int(after["execution_count"]) - int(before.get("execution_count", 0))
    assert inferences == 32
    assert executions < inferences, f"{executions} executions for {inferences} inferences"


def test_bad_inputs_are_clear_client_errors(triton):
    audio, latents = frames(2)
    with MuseTalkClient(triton.grpc_url) as client:
        with pytest.raises(InvalidInput, match="latents.*shape"):
            client.unet(latents[:, :4], audio)
        with pytest.raises(InvalidInput, match="float32"):
            client.unet(latents.astype(np.float64), audio)
        with pytest.raises(InvalidInput, match="batch size"):
            client.unet(latents, audio[:1])
        with pytest.raises(ModelNotFound, match="no_such_model"):
            client.infer("no_such_model", {"x": audio})


@pytest.mark.parametrize("protocol", ["grpc", "http"])
@pytest.mark.parametrize("case, expected", [
    ("wrong shape", InvalidInput), ("missing input", InvalidInput), ("unknown model", ModelNotFound),
])
def test_server_side_rejections_are_classified_by_status_code(triton, protocol, case, expected):
    """Requests that bypass the SDK's own checks: Triton's answers are classified by the
    gRPC status code or HTTP status their exception carries, whatever the message says."""
    module, url = (grpcclient, triton.grpc_url) if protocol == "grpc" else (httpclient, triton.http_url)
    raw = module.InferenceServerClient(url)
    latents = module.InferInput("latents", [1, 8, 32, 31 if case == "wrong shape" else 32], "FP32")
    latents.set_data_from_numpy(np.zeros(latents.shape(), np.float32))
    audio = module.InferInput("audio_embedding", [1, 50, 384], "FP32")
    audio.set_data_from_numpy(np.zeros((1, 50, 384), np.float32))
    inputs = {"wrong shape": [latents, audio], "missing input": [audio], "unknown model": [audio]}[case]
    with pytest.raises(Exception) as caught:
        raw.infer("no_such_model" if case == "unknown model" else "unet", inputs)
    assert type(translate(caught.value, "unet")) is expected


def test_classification_ignores_the_message_text():
    """A failure whose text happens to say "expected" is not an input error."""
    from tritonclient.utils import InferenceServerException

    internal = InferenceServerException("expected the GPU to answer", status="StatusCode.INTERNAL")
    assert type(translate(internal, "unet")) is InferenceFailed
    assert type(translate(InferenceServerException("x", status="503"), "unet")) is ModelNotReady
    # Over gRPC a model not loaded and a refused connection share UNAVAILABLE.
    loading = InferenceServerException("Request for unknown model: 'unet' has no available versions",
                                       status="StatusCode.UNAVAILABLE")
    assert type(translate(loading, "unet")) is ModelNotReady
    refused = InferenceServerException("failed to connect to all addresses; last error: Connection refused",
                                       status="StatusCode.UNAVAILABLE")
    assert type(translate(refused, "unet")) is ServerUnavailable
    assert type(translate(ConnectionRefusedError(111, "refused"), "unet")) is ServerUnavailable


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_unreachable_server_is_a_clear_error(protocol):
    port = Ports.free().grpc
    with MuseTalkClient(f"localhost:{port}", protocol, timeout_s=5) as client:
        assert not client.server_ready()
        with pytest.raises(ServerUnavailable, match="cannot reach"):
            client.musetalk(*frames(1))
        with pytest.raises(ServerUnavailable, match="not ready after"):
            client.wait_until_ready(timeout_s=0.5)


def test_perf_analyzer_measures_the_ensemble(triton):
    """The perf_analyzer command the README documents works against the local server."""
    from benchmarks.perf_analyzer import perf_analyzer_command, run

    command = perf_analyzer_command("musetalk", triton.grpc_url, "grpc", concurrency="1",
                                    batch_size=1, measurement_ms=1500)
    out = run(command, timeout=300)
    assert "Throughput" in out


def test_perf_analyzer_sweeps_levels_and_reads_the_batches_triton_merged(triton):
    """Concurrency levels run one by one; each row says how many frames the unet's executions
    held, from Triton's own statistics (dynamic batching merges concurrent requests)."""
    from benchmarks.perf_analyzer import sweep

    rows = sweep({"grpc": triton.grpc_url}, ["musetalk"], "1,2", batch_size=1, request_count=None,
                 measurement_ms=1000)
    assert [r["concurrency"] for r in rows] == [1, 2]
    for row in rows:
        assert row["inferences_per_s"] > 0 and row["p95_ms"] >= row["p50_ms"] > 0
        assert 1.0 <= row["average_batch"]["unet"] <= 2.0  # never more frames than requests in flight


def test_wait_until_ready_names_what_is_missing(triton):
    with MuseTalkClient(triton.grpc_url) as client:
        client.wait_until_ready(timeout_s=30)  # every model of the contract is served
        with pytest.raises(ModelNotReady, match="not_a_model"):
            client.wait_until_ready(timeout_s=0.5, models=["unet", "not_a_model"])


def test_model_config_says_whether_weights_are_synthetic(triton):
    with MuseTalkClient(triton.http_url, "http") as client:
        parameters = client.model_config("unet")["parameters"]
    assert parameters["musetalk.synthetic"]["string_value"] == "true"


def test_submit_keeps_requests_in_flight_on_the_clients_threads(triton):
    audio, latents = frames(3)
    with MuseTalkClient(triton.grpc_url) as client:
        futures = [client.submit(client.musetalk, audio, latents) for _ in range(3)]
        results = [f.result() for f in futures]
        assert all(np.array_equal(r, results[0]) for r in results)
        np.testing.assert_array_equal(results[0], client.musetalk(audio, latents))


def inference_stats(client: MuseTalkClient, model: str) -> tuple[int, int]:
    """(frames inferred, requests failed or cancelled) of `model`, from Triton's statistics."""
    stats = client.statistics(model)
    return int(stats.get("inference_count", 0)), int(stats["inference_stats"].get("fail", {}).get("count", 0))


def test_a_cancelled_request_is_cancelled_on_the_server(triton):
    """gRPC cancellation reaches Triton: the ensemble never runs the steps a cancelled request
    has not started (here the vae_decoder of the second batch, queued behind the first)."""
    audio, latents = frames(32)
    with MuseTalkClient(triton.grpc_url) as client:
        models = ("positional_encoding", "unet", "vae_decoder", "musetalk")
        before = {m: inference_stats(client, m) for m in models}
        first = client.submit(client.musetalk, audio, latents)
        second = client.submit(client.musetalk, audio, latents)
        time.sleep(0.05)
        assert second.cancel() and second.cancelled()
        assert first.result().shape == (32, 256, 256, 3)
        deadline = time.monotonic() + 30
        while inference_stats(client, "musetalk")[1] == before["musetalk"][1]:  # the cancel is seen
            assert time.monotonic() < deadline, "Triton never saw the cancellation"
            time.sleep(0.1)
        after = {m: inference_stats(client, m) for m in models}
    assert after["vae_decoder"][0] - before["vae_decoder"][0] == 32  # the first batch only
    # The step the cancelled request never started is counted as a fail of that model.
    assert sum(after[m][1] - before[m][1] for m in models[:3]) == 1
    with pytest.raises(CancelledError):
        second.result()


