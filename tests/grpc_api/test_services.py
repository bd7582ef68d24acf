"""Both gRPC services, health and reflection, against a real grpc.aio server on a loopback port.

The server runs on the real Engine over real checkpoints written by tests/factories.py; answers
are compared with the same checkpoints loaded and run directly (models.checkpoint.load).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import textwrap
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from prometheus_client import CollectorRegistry

from models.checkpoint import load
from models.encoder import collate
from rnnserve_client.proto.inference import grpc_service_pb2 as v2
from rnnserve_client.proto.inference import grpc_service_pb2_grpc as v2_grpc
from rnnserve_client.proto.rnnserve.v1 import rnnserve_pb2 as pb
from rnnserve_client.proto.rnnserve.v1 import rnnserve_pb2_grpc as pb_grpc
from service.core.engine import Engine
from service.core.metrics import Metrics
from service.core.settings import Settings
from service.grpc_api.server import GrpcServer, create_grpc_server
from service.grpc_api.v1_servicer import RnnServeServicer
from service.grpc_api.v2_servicer import InferenceServicer
from service.inference_protocol.tensors import pack_bytes
from tests.factories import write_model
from tests.support import decode_v2_outputs

pytestmark = pytest.mark.timeout(60)

FEATURES = 4
LABELS = ["neg", "pos", "neutral"]
TOKEN = "s3cret"
AUTH = (("authorization", f"Bearer {TOKEN}"),)


@dataclass
class Served:
    repository: Path
    engine: Engine
    server: GrpcServer
    metrics: Metrics
    channel: grpc.aio.Channel
    port: int
    # Overall health seen before the engine started (models loading).
    loading_status: int = -1

    @property
    def api(self) -> pb_grpc.RnnServeStub:
        return pb_grpc.RnnServeStub(self.channel)

    @property
    def v2(self) -> v2_grpc.GRPCInferenceServiceStub:
        return v2_grpc.GRPCInferenceServiceStub(self.channel)

    @property
    def health(self) -> health_pb2_grpc.HealthStub:
        return health_pb2_grpc.HealthStub(self.channel)


def _repository(root: Path) -> Path:
    write_model(root, "enc", input_type="features", input_size=FEATURES, head=LABELS, seed=1)
    write_model(root, "tok", input_type="tokens", cell="gru", bidirectional=True, seed=2)
    write_model(root, "s2s", task="seq2seq", input_type="text", attention=True, seed=3)
    write_model(
        root,
        "slow",
        input_type="features",
        input_size=FEATURES,
        serving={"max_batch_size": 64, "max_delay_ms": 3000.0, "max_queue_size": 2},
    )
    return root


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[Served]:
    repository = _repository(tmp_path / "repo")
    settings = Settings(
        repository=repository,
        host="127.0.0.1",
        grpc_port=0,
        http_port=0,
        device="cpu",
        cpu_threads=1,
        management_enabled=True,
        management_token=TOKEN,
        drain_grace_s=2.0,
    )
    metrics = Metrics(CollectorRegistry())
    engine = Engine(settings, metrics)
    server = create_grpc_server(engine, settings, metrics)
    port = await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    served = Served(repository, engine, server, metrics, channel, port)
    # NOTE: health is checked before the engine starts: "loading" must read NOT_SERVING.
    served.loading_status = (await served.health.Check(health_pb2.HealthCheckRequest())).status
    await engine.start()
    try:
        yield served
    finally:
        await channel.close()
        await server.stop(0)
        if not engine.draining:
            await engine.drain(1.0)


async def eventually(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    """Wait until `condition()` holds (polled; the loop keeps serving meanwhile)."""
    for _ in range(int(timeout_s / 0.005)):
        if condition():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("condition never held")


def _sample(served: Served, name: str, **labels: str) -> float | None:
    return served.metrics.registry.get_sample_value(name, labels)


@contextlib.asynccontextmanager
async def device_held(engine: Engine) -> AsyncIterator[None]:
    """Keep the engine's device thread busy (so batches wait) until the block ends."""
    release = threading.Event()
    job = asyncio.ensure_future(engine.executor.run(release.wait, 30.0))
    await eventually(lambda: not engine.executor.idle)
    try:
        yield
    finally:
        release.set()
        await job


async def _wait_status(served: Served, service: str, status: int) -> None:
    request = health_pb2.HealthCheckRequest(service=service)
    for _ in range(100):
        try:
            if (await served.health.Check(request)).status == status:
                return
        except grpc.aio.AioRpcError:
            pass
        await asyncio.sleep(0.05)
    raise AssertionError(f"health of {service!r} never became {status}")


def _direct_encode(
    repository: Path, name: str, sequences: list[torch.Tensor], pooling: str | None = None
) -> tuple[np.ndarray, np.ndarray | None]:
    loaded = load(repository / name / "1")
    inputs, lengths = collate(sequences)
    with torch.inference_mode():
        out = loaded.model(inputs, lengths, pooling=pooling)  # type: ignore[operator]
    scores = None if out.scores is None else out.scores.numpy()
    return out.encodings.numpy(), scores


def _features(n: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.normal(size=(int(t), FEATURES)).astype(np.float32) for t in rng.integers(1, 9, n)]


def _encode_message(model: str, sequences: list[np.ndarray], **kw: Any) -> pb.EncodeRequest:
    message = pb.EncodeRequest(model=model, **kw)
    for seq in sequences:
        message.inputs.sequences.add(shape=seq.shape, values=seq.ravel().tolist())
    return message


# --- rnnserve.v1 -------------------------------------------------------------------------------


async def test_encode_features_matches_direct_model(served: Served) -> None:
    sequences = _features(5, seed=0)
    answer = await served.api.Encode(_encode_message("enc", sequences))
    expected, scores = _direct_encode(
        served.repository, "enc", [torch.from_numpy(s) for s in sequences]
    )
    assert (answer.model, answer.version) == ("enc", 1)
    got = np.array([np.array(e.values).reshape(e.shape) for e in answer.encodings])
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    assert scores is not None
    got_scores = np.array([s.values for s in answer.scores])
    np.testing.assert_allclose(got_scores, scores, rtol=1e-4, atol=1e-5)
    assert list(answer.labels) == [LABELS[i] for i in scores.argmax(axis=1)]


async def test_encode_tokens_pooling_none_gives_per_step_encodings(served: Served) -> None:
    rows = [[1, 2, 3], [4, 5], [6, 7, 8, 9, 10]]
    message = pb.EncodeRequest(model="tok", pooling="none", version=1)
    for row in rows:
        message.tokens.sequences.add(ids=row)
    answer = await served.api.Encode(message)
    expected, _ = _direct_encode(
        served.repository, "tok", [torch.tensor(r) for r in rows], pooling="none"
    )
    for row, encoding, full in zip(rows, answer.encodings, expected, strict=True):
        assert list(encoding.shape) == [len(row), full.shape[-1]]
        np.testing.assert_allclose(
            np.array(encoding.values).reshape(encoding.shape), full[: len(row)], atol=1e-5
        )


async def test_generate_and_stream_match_offline_generation(served: Served) -> None:
    texts = ["hello", "a quick test", "x"]
    loaded = load(served.repository / "s2s" / "1")
    assert loaded.input_tokenizer is not None and loaded.output_tokenizer is not None
    inputs, lengths = collate([torch.tensor(loaded.input_tokenizer.encode(t)) for t in texts])
    with torch.inference_mode():
        expected = loaded.model.generate(inputs, lengths, max_length=12)  # type: ignore[operator]

    request = pb.GenerateRequest(model="s2s", texts=pb.TextInputs(texts=texts), max_length=12)
    answer = await served.api.Generate(request)
    assert [list(o.tokens) for o in answer.outputs] == expected
    assert [o.text for o in answer.outputs] == [
        loaded.output_tokenizer.decode(ids) for ids in expected
    ]

    streamed: dict[int, list[int]] = {i: [] for i in range(len(texts))}
    final = None
    async for event in served.api.GenerateStream(request):
        if event.HasField("token"):
            assert final is None, "token after the final result"
            streamed[event.token.index].append(event.token.token)
        else:
            final = event.result
    assert final is not None
    assert [list(o.tokens) for o in final.outputs] == expected
    assert [streamed[i] for i in range(len(texts))] == expected


async def test_cancelled_stream_is_recorded_and_released(served: Served) -> None:
    request = pb.GenerateRequest(model="s2s", texts=pb.TextInputs(texts=["some source"]))
    async with device_held(served.engine):
        call = served.api.GenerateStream(request)
        # Admitted (in flight) but not computed while the device is held; then the client goes.
        await eventually(lambda: _sample(served, "rnnserve_inflight_requests", model="s2s") == 1)
        call.cancel()
        labels = {"model": "s2s", "version": "", "protocol": "grpc"}
        await eventually(
            lambda: (
                _sample(
                    served,
                    "rnnserve_requests_total",
                    **labels,
                    endpoint="generate_stream",
                    outcome="cancelled",
                )
                == 1
            )
        )
    await eventually(lambda: _sample(served, "rnnserve_inflight_requests", model="s2s") == 0)
    dropped = {"model": "s2s", "version": "1", "reason": "cancelled"}
    await eventually(lambda: _sample(served, "rnnserve_dropped_sequences_total", **dropped) == 1)


async def test_list_and_get_models(served: Served) -> None:
    listed = await served.api.ListModels(pb.ListModelsRequest())
    assert {m.name for m in listed.models} == {"enc", "tok", "s2s", "slow"}
    info = await served.api.GetModel(pb.GetModelRequest(name="s2s"))
    assert [(v.version, v.state) for v in info.versions] == [(1, "READY")]
    assert info.architecture["task"] == "seq2seq"


async def test_management_needs_the_token_and_changes_health(served: Served) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await served.api.UnloadModel(pb.UnloadModelRequest(name="tok"))
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    await _wait_status(served, "tok", health_pb2.HealthCheckResponse.SERVING)

    await served.api.UnloadModel(pb.UnloadModelRequest(name="tok"), metadata=AUTH)
    await _wait_status(served, "tok", health_pb2.HealthCheckResponse.NOT_SERVING)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await served.api.Encode(pb.EncodeRequest(model="tok", tokens=pb.TokenInputs()))
    assert caught.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.NOT_FOUND)

    info = await served.api.LoadModel(pb.LoadModelRequest(name="tok"), metadata=AUTH)
    assert [v.state for v in info.versions] == ["READY"]
    await _wait_status(served, "tok", health_pb2.HealthCheckResponse.SERVING)
    info = await served.api.ReloadModel(pb.ReloadModelRequest(name="tok"), metadata=AUTH)
    assert any(v.state == "READY" for v in info.versions)


async def test_management_disabled_and_message_size_limit(tmp_path: Path) -> None:
    settings = Settings(
        repository=tmp_path,
        grpc_port=0,
        device="cpu",
        management_enabled=False,
        grpc_max_message_bytes=4096,
    )
    metrics = Metrics(CollectorRegistry())
    server = create_grpc_server(Engine(settings, metrics), settings, metrics)
    port = await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.RnnServeStub(channel)
            code, details = await _code(stub.LoadModel(pb.LoadModelRequest(name="x")))
            assert code == grpc.StatusCode.PERMISSION_DENIED and "management" in details
            v2_stub = v2_grpc.GRPCInferenceServiceStub(channel)
            request = v2.RepositoryModelUnloadRequest(model_name="x")
            code, _ = await _code(v2_stub.RepositoryModelUnload(request))
            assert code == grpc.StatusCode.PERMISSION_DENIED
            big = _encode_message("enc", [np.zeros((2000, 1), np.float32)])
            code, details = await _code(stub.Encode(big))
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "4096" in details
    finally:
        await server.stop(0)


async def test_management_enabled_without_token_is_refused(tmp_path: Path) -> None:
    settings = Settings(repository=tmp_path, grpc_port=0, device="cpu", management_enabled=True)
    metrics = Metrics(CollectorRegistry())
    server = create_grpc_server(Engine(settings, metrics), settings, metrics)
    port = await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.RnnServeStub(channel)
            code, details = await _code(stub.LoadModel(pb.LoadModelRequest(name="x")))
            assert code == grpc.StatusCode.PERMISSION_DENIED
            assert "RNNSERVE_MANAGEMENT_TOKEN" in details
    finally:
        await server.stop(0)


# --- errors ------------------------------------------------------------------------------------


async def _code(call: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value.code(), caught.value.details() or ""


async def test_invalid_argument_names_field_and_limit(served: Served) -> None:
    bad_size = _encode_message("enc", [np.zeros((3, FEATURES + 1), np.float32)])
    code, details = await _code(served.api.Encode(bad_size))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.startswith("inputs[0]") and str(FEATURES) in details

    too_long = _encode_message("enc", [np.zeros((2049, FEATURES), np.float32)])
    code, details = await _code(served.api.Encode(too_long))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "inputs[0]" in details and "2048" in details

    code, details = await _code(served.api.Encode(pb.EncodeRequest(model="enc", pooling="avg")))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("pooling")


async def test_stream_errors_end_the_stream_with_their_code(served: Served) -> None:
    async def first_error(request: pb.GenerateRequest) -> tuple[grpc.StatusCode, str]:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for _ in served.api.GenerateStream(request):
                pass
        return caught.value.code(), caught.value.details() or ""

    texts = pb.TextInputs(texts=["abc"])
    code, _ = await first_error(pb.GenerateRequest(model="nope", texts=texts))
    assert code == grpc.StatusCode.NOT_FOUND
    code, details = await first_error(pb.GenerateRequest(model="enc", texts=texts))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("model")
    code, details = await first_error(pb.GenerateRequest(model="s2s", texts=texts, beam_size=999))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "beam_size" in details
    # Unknown names are recorded blank, so made-up names cannot grow the metric series.
    failed = {"model": "", "version": "", "protocol": "grpc", "endpoint": "generate_stream"}
    assert _sample(served, "rnnserve_requests_total", **failed, outcome="not_found") == 1


def _bad_v1() -> list[tuple[pb.EncodeRequest, str]]:
    empty_seq = pb.EncodeRequest(model="enc")
    empty_seq.inputs.sequences.add(shape=[0, FEATURES])
    nan = _encode_message("enc", [np.full((2, FEATURES), np.nan, np.float32)])
    tokens = pb.EncodeRequest(model="tok")
    tokens.tokens.sequences.add(ids=[1, 10_000])  # vocab_size 20: the limit is named
    return [
        (pb.EncodeRequest(model="enc", inputs=pb.FeatureInputs()), "inputs"),
        (empty_seq, "inputs[0]"),
        (nan, "inputs[0][0]"),
        (tokens, "tokens[0][1]"),
        (pb.EncodeRequest(model="enc", tokens=pb.TokenInputs()), "tokens"),
        (pb.EncodeRequest(model="s2s", texts=pb.TextInputs(texts=["x"])), "model"),
    ]


@pytest.mark.parametrize("index", range(6))
async def test_bad_inputs_are_invalid_argument_naming_the_field(served: Served, index: int) -> None:
    message, field = _bad_v1()[index]
    code, details = await _code(served.api.Encode(message))
    assert code == grpc.StatusCode.INVALID_ARGUMENT, details
    assert details.startswith(field + ": "), details


async def test_bad_v2_tensors_are_invalid_argument(served: Served) -> None:
    ints = v2.ModelInferRequest(model_name="enc")
    ints.inputs.add(name="INPUT", datatype="INT32", shape=[1, 2, FEATURES])
    ints.raw_input_contents.append(np.zeros((1, 2, FEATURES), "<i4").tobytes())
    lengths = v2.ModelInferRequest(model_name="s2s")
    lengths.inputs.add(name="TEXT", datatype="BYTES", shape=[1]).contents.bytes_contents.append(
        b"a"
    )
    lengths.inputs.add(name="LENGTHS", datatype="INT64", shape=[1]).contents.int64_contents.append(
        1
    )
    negative = v2.ModelInferRequest(model_name="enc")
    negative.inputs.add(name="INPUT", datatype="FP32", shape=[1, -2, FEATURES])
    cases = [
        (ints, "inputs[0].datatype"),
        (lengths, "inputs[1].name"),
        (negative, "inputs[0].shape"),
    ]
    for request, field in cases:
        code, details = await _code(served.v2.ModelInfer(request))
        assert code == grpc.StatusCode.INVALID_ARGUMENT, details
        assert details.startswith(field + ": "), details


async def test_not_found(served: Served) -> None:
    code, details = await _code(served.api.GetModel(pb.GetModelRequest(name="nope")))
    assert code == grpc.StatusCode.NOT_FOUND and "nope" in details
    message = _encode_message("nope", _features(1, seed=1))
    assert (await _code(served.api.Encode(message)))[0] == grpc.StatusCode.NOT_FOUND


async def test_an_unknown_model_names_the_closest_known_one(served: Served) -> None:
    # As over REST: the refusal says which model the client probably meant.
    code, details = await _code(served.api.Encode(_encode_message("Enc", _features(1, seed=1))))
    assert (code, details) == (
        grpc.StatusCode.NOT_FOUND,
        "model 'Enc' is not known; did you mean 'enc'?",
    )
    request = _v2_features_request(_features(2, seed=6), raw=True)
    request.model_name = "ENC"
    code, details = await _code(served.v2.ModelInfer(request))
    assert (code, details) == (
        grpc.StatusCode.NOT_FOUND,
        "model 'ENC' is not known; did you mean 'enc'?",
    )


async def test_an_explicit_version_0_is_invalid_and_an_unset_one_is_the_newest(
    served: Served,
) -> None:
    # NOTE: as REST refuses the path version 0 (versions are the repository's folders 1, 2, ...).
    zero = _encode_message("enc", _features(1, seed=1), version=0)
    assert await _code(served.api.Encode(zero)) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "version: must be a positive integer, got 0",
    )
    unset = await served.api.Encode(_encode_message("enc", _features(1, seed=1)))
    assert unset.version == 1


async def test_deadline_exceeded_before_compute(served: Served) -> None:
    # While the device is busy, "slow" closes a batch only after 3 s: 50 ms expire in the queue.
    message = _encode_message("slow", _features(1, seed=2), timeout_ms=50)
    labels = {"model": "slow", "version": "1", "kind": "encode"}
    calls_before = _sample(served, "rnnserve_batch_size_count", **labels)
    async with device_held(served.engine):
        code, _ = await _code(served.api.Encode(message))
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    await eventually(lambda: _sample(served, "rnnserve_queue_depth", **labels) == 0)
    assert _sample(served, "rnnserve_batch_size_count", **labels) == calls_before, "computed"


async def test_full_queue_is_resource_exhausted(served: Served) -> None:
    # "slow" holds at most 2 queued sequences; with the device busy, the third is refused.
    async with device_held(served.engine):
        queued = asyncio.ensure_future(
            served.api.Encode(_encode_message("slow", _features(2, seed=1)))
        )
        depth = {"model": "slow", "version": "1", "kind": "encode"}
        await eventually(lambda: _sample(served, "rnnserve_queue_depth", **depth) == 2)
        call = served.api.Encode(_encode_message("slow", _features(1, seed=9)))
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    trailing = dict(caught.value.trailing_metadata() or ())
    assert float(trailing["retry-after"]) > 0
    assert trailing["rnnserve-error-type"] == "Overloaded"
    assert len((await queued).encodings) == 2


async def test_refusals_name_the_error_type_and_field_in_trailing_metadata(served: Served) -> None:
    # One gRPC code may stand for several error types (UNAVAILABLE: NotReady and Draining):
    # the metadata names the type, as REST's error body does, and the field of bad input.
    bad_size = _encode_message("enc", [np.zeros((3, FEATURES + 1), np.float32)])
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await served.api.Encode(bad_size)
    trailing = dict(caught.value.trailing_metadata() or ())
    assert trailing["rnnserve-error-type"] == "InvalidInput"
    assert trailing["rnnserve-error-field"] == "inputs[0]"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await served.api.Encode(_encode_message("nope", _features(1, seed=1)))
    assert dict(caught.value.trailing_metadata() or ())["rnnserve-error-type"] == "NotFound"
    await served.engine.drain(1.0)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await served.api.Encode(_encode_message("enc", _features(1, seed=1)))
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert dict(caught.value.trailing_metadata() or ())["rnnserve-error-type"] == "Draining"


async def test_draining_sends_goaway_finishes_running_calls_and_health_goes_not_serving(
    served: Served,
) -> None:
    assert served.loading_status == health_pb2.HealthCheckResponse.NOT_SERVING
    await _wait_status(served, "", health_pb2.HealthCheckResponse.SERVING)
    await _wait_status(served, "rnnserve.v1.RnnServe", health_pb2.HealthCheckResponse.SERVING)
    await _wait_status(served, "enc", health_pb2.HealthCheckResponse.SERVING)

    watch = served.health.Watch(health_pb2.HealthCheckRequest(service=""))
    assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
    async with device_held(served.engine):
        running = served.api.Encode(_encode_message("enc", _features(1, seed=3)))
        await eventually(lambda: _inflight(served) > 0)
        await served.server.begin_drain()
        drained = asyncio.ensure_future(served.engine.drain(2.0))
        # A watcher hears NOT_SERVING. Once the client has read the GOAWAY, a new call cannot
        # reach this server (it stopped listening): it would go to another replica. (A call
        # that races the GOAWAY is CANCELLED unprocessed; rnnserve_client retries it.)
        assert (await watch.read()).status == health_pb2.HealthCheckResponse.NOT_SERVING
        await eventually(lambda: served.channel.get_state() != grpc.ChannelConnectivity.READY)
        code, details = await _code(served.api.Encode(_encode_message("enc", _features(1, seed=4))))
        assert code == grpc.StatusCode.UNAVAILABLE, details
    # The call admitted before the drain is answered.
    assert len((await running).encodings) == 1
    watch.cancel()
    await drained


def _inflight(served: Served) -> float:
    return _sample(served, "rnnserve_inflight_requests", model="enc") or 0.0


async def test_request_metrics_are_recorded_with_protocol(served: Served) -> None:
    await served.api.Encode(_encode_message("enc", _features(2, seed=4)))
    await _code(served.api.Encode(pb.EncodeRequest(model="nope", pooling="avg")))
    registry = served.metrics.registry
    labels = {"model": "enc", "version": "1", "protocol": "grpc", "endpoint": "encode"}
    assert (
        registry.get_sample_value("rnnserve_requests_total", labels | {"outcome": "success"}) == 1
    )
    failed = {"model": "", "version": "", "protocol": "grpc", "endpoint": "encode"}
    assert (
        registry.get_sample_value("rnnserve_requests_total", failed | {"outcome": "invalid_input"})
        == 1
    )


# --- reflection --------------------------------------------------------------------------------


async def test_reflection_lists_every_service(served: Served) -> None:
    def services() -> list[str]:
        with grpc.insecure_channel(f"127.0.0.1:{served.port}") as channel:
            database = ProtoReflectionDescriptorDatabase(channel)
            names = list(database.get_services())
            database.FindFileContainingSymbol("rnnserve.v1.EncodeRequest")
            return names

    names = await asyncio.to_thread(services)
    assert {
        "rnnserve.v1.RnnServe",
        "inference.GRPCInferenceService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    } <= set(names)


# --- Open Inference Protocol -------------------------------------------------------------------


async def test_v2_server_and_model_endpoints(served: Served) -> None:
    assert (await served.v2.ServerLive(v2.ServerLiveRequest())).live
    assert (await served.v2.ServerReady(v2.ServerReadyRequest())).ready
    meta = await served.v2.ServerMetadata(v2.ServerMetadataRequest())
    assert meta.name == "rnnserve" and "model_repository" in meta.extensions
    assert (await served.v2.ModelReady(v2.ModelReadyRequest(name="enc"))).ready
    assert not (await served.v2.ModelReady(v2.ModelReadyRequest(name="nope"))).ready
    model = await served.v2.ModelMetadata(v2.ModelMetadataRequest(name="enc"))
    assert [(t.name, t.datatype, list(t.shape)) for t in model.inputs] == [
        ("INPUT", "FP32", [-1, -1, FEATURES]),
        ("LENGTHS", "INT64", [-1]),
    ]
    assert [t.name for t in model.outputs] == ["ENCODING", "SCORES", "LABELS"]
    index = await served.v2.RepositoryIndex(v2.RepositoryIndexRequest(ready=True), metadata=AUTH)
    assert {(m.name, m.version, m.state) for m in index.models} >= {("enc", "1", "READY")}
    code, _ = await _code(served.v2.ModelMetadata(v2.ModelMetadataRequest(name="nope")))
    assert code == grpc.StatusCode.NOT_FOUND


async def test_v2_repository_unload_and_load(served: Served) -> None:
    unload = v2.RepositoryModelUnloadRequest(model_name="tok")
    code, _ = await _code(served.v2.RepositoryModelUnload(unload))
    assert code == grpc.StatusCode.UNAUTHENTICATED
    await served.v2.RepositoryModelUnload(unload, metadata=AUTH)
    assert not (await served.v2.ModelReady(v2.ModelReadyRequest(name="tok"))).ready
    index = await served.v2.RepositoryIndex(v2.RepositoryIndexRequest(ready=True), metadata=AUTH)
    assert "tok" not in {m.name for m in index.models}
    await served.v2.RepositoryModelLoad(
        v2.RepositoryModelLoadRequest(model_name="tok"), metadata=AUTH
    )
    assert (await served.v2.ModelReady(v2.ModelReadyRequest(name="tok", version="1"))).ready
    # Loading a loaded model reloads it (Triton's semantics); it stays ready.
    await served.v2.RepositoryModelLoad(
        v2.RepositoryModelLoadRequest(model_name="tok"), metadata=AUTH
    )
    assert (await served.v2.ModelReady(v2.ModelReadyRequest(name="tok"))).ready


def _v2_features_request(sequences: list[np.ndarray], raw: bool) -> v2.ModelInferRequest:
    batch = np.zeros((len(sequences), max(len(s) for s in sequences), FEATURES), np.float32)
    for i, seq in enumerate(sequences):
        batch[i, : len(seq)] = seq
    lengths = np.array([len(s) for s in sequences], np.int64)
    request = v2.ModelInferRequest(model_name="enc", id="req-1")
    x = request.inputs.add(name="INPUT", datatype="FP32", shape=batch.shape)
    n = request.inputs.add(name="LENGTHS", datatype="INT64", shape=lengths.shape)
    if raw:
        request.raw_input_contents.extend(
            [batch.astype("<f4").tobytes(), lengths.astype("<i8").tobytes()]
        )
    else:
        x.contents.fp32_contents.extend(batch.ravel().tolist())
        n.contents.int64_contents.extend(lengths.tolist())
    return request


@pytest.mark.parametrize("raw", [True, False], ids=["raw", "typed"])
async def test_v2_infer_encoder(served: Served, raw: bool) -> None:
    sequences = _features(4, seed=5)
    response = await served.v2.ModelInfer(_v2_features_request(sequences, raw))
    assert (response.model_name, response.model_version, response.id) == ("enc", "1", "req-1")
    outputs = decode_v2_outputs(response)
    expected, scores = _direct_encode(
        served.repository, "enc", [torch.from_numpy(s) for s in sequences]
    )
    encoding = outputs["ENCODING"].data
    assert isinstance(encoding, np.ndarray)
    np.testing.assert_allclose(encoding, expected, rtol=1e-4, atol=1e-5)
    assert scores is not None
    assert outputs["LABELS"].data == [LABELS[i].encode() for i in scores.argmax(axis=1)]
    assert outputs["LABELS"].shape == [4]


async def test_v2_infer_seq2seq_text_and_requested_output(served: Served) -> None:
    request = v2.ModelInferRequest(model_name="s2s")
    request.inputs.add(name="TEXT", datatype="BYTES", shape=[2])
    request.raw_input_contents.append(pack_bytes([b"abc", b"hello"]))
    request.parameters["max_length"].int64_param = 7
    request.outputs.add(name="OUTPUT_TEXT")
    response = await served.v2.ModelInfer(request)
    assert [o.name for o in response.outputs] == ["OUTPUT_TEXT"]
    direct = await served.api.Generate(
        pb.GenerateRequest(model="s2s", texts=pb.TextInputs(texts=["abc", "hello"]), max_length=7)
    )
    text = decode_v2_outputs(response)["OUTPUT_TEXT"]
    assert isinstance(text.data, list) and text.shape == [2]
    assert [t.decode() for t in text.data] == [o.text for o in direct.outputs]


async def test_v2_infer_errors(served: Served) -> None:
    request = _v2_features_request(_features(2, seed=6), raw=True)
    request.raw_input_contents[0] = request.raw_input_contents[0][:-4]
    code, details = await _code(served.v2.ModelInfer(request))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("raw_input_contents[0]")
    request = _v2_features_request(_features(2, seed=6), raw=True)
    request.model_version = "7"
    code, _ = await _code(served.v2.ModelInfer(request))
    assert code == grpc.StatusCode.NOT_FOUND


async def test_v2_stream_infer_answers_every_request_and_errors_inline(served: Served) -> None:
    good = [_v2_features_request(_features(2, seed=s), raw=True) for s in range(3)]
    for i, request in enumerate(good):
        request.id = f"ok-{i}"
    bad = v2.ModelInferRequest(model_name="nope", id="bad")

    async def requests() -> AsyncIterator[v2.ModelInferRequest]:
        for request in [*good, bad]:
            yield request

    answers = [a async for a in served.v2.ModelStreamInfer(requests())]
    by_id = {a.infer_response.id: a for a in answers}
    assert set(by_id) == {"ok-0", "ok-1", "ok-2", "bad"}
    assert "nope" in by_id["bad"].error_message
    for i in range(3):
        assert not by_id[f"ok-{i}"].error_message
        assert by_id[f"ok-{i}"].infer_response.outputs[0].name == "ENCODING"


# --- requests that do not parse ----------------------------------------------------------------

# Field 1, length-delimited, claims 5 bytes and has none: no message type parses it.
NOT_A_MESSAGE = b"\x0a\x05"


async def _stream_outcome(call: Any) -> tuple[grpc.StatusCode, str, list[bytes]]:
    """The status, details and raw messages of a streamed call (no deserializer: bytes)."""
    received: list[bytes] = []
    try:
        async for message in call:
            received.append(message)
    except grpc.aio.AioRpcError as exc:
        return exc.code(), exc.details() or "", received
    return grpc.StatusCode.OK, "", received


@pytest.mark.parametrize(
    ("path", "message", "protocol", "endpoint"),
    [
        ("/rnnserve.v1.RnnServe/Encode", "rnnserve.v1.EncodeRequest", "grpc", "encode"),
        (
            "/inference.GRPCInferenceService/ModelInfer",
            "inference.ModelInferRequest",
            "v2-grpc",
            "infer",
        ),
    ],
)
async def test_a_unary_request_that_does_not_parse_is_invalid_argument(
    served: Served, path: str, message: str, protocol: str, endpoint: str
) -> None:
    code, details = await _code(served.channel.unary_unary(path)(NOT_A_MESSAGE))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details == f"request: not a valid {message} message"
    # Counted as a failed request of its endpoint (no model: the message never said which).
    failed = {"protocol": protocol, "endpoint": endpoint, "outcome": "invalid_input"}
    assert _sample(served, "rnnserve_requests_total", model="", version="", **failed) == 1
    # The same server answers the next, valid request.
    assert len((await served.api.Encode(_encode_message("enc", _features(1, 1)))).encodings) == 1


def test_every_counted_rpc_names_a_real_method() -> None:
    # A misspelt entry would leave that RPC's unparseable requests uncounted, silently.
    cases = [
        (RnnServeServicer.ENDPOINTS, pb.DESCRIPTOR.services_by_name["RnnServe"], {"StreamSession"}),
        (
            InferenceServicer.ENDPOINTS,
            v2.DESCRIPTOR.services_by_name["GRPCInferenceService"],
            {"ServerLive", "ServerReady", "ServerMetadata", "ModelStreamInfer"},
        ),
    ]
    for endpoints, service, uncounted in cases:
        assert set(endpoints) == {m.name for m in service.methods} - uncounted


async def test_a_generate_stream_request_that_does_not_parse_is_invalid_argument(
    served: Served,
) -> None:
    stream = served.channel.unary_stream("/rnnserve.v1.RnnServe/GenerateStream")
    code, details, events = await _stream_outcome(stream(NOT_A_MESSAGE))
    assert (code, details, events) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "request: not a valid rnnserve.v1.GenerateRequest message",
        [],
    )
    failed = {"protocol": "grpc", "endpoint": "generate_stream", "outcome": "invalid_input"}
    assert _sample(served, "rnnserve_requests_total", model="", version="", **failed) == 1


async def test_a_session_message_that_does_not_parse_ends_the_session(served: Served) -> None:
    session = served.channel.stream_stream("/rnnserve.v1.RnnServe/StreamSession")
    opening = pb.SessionRequest(open=pb.SessionOpen(model="enc")).SerializeToString()
    chunk = pb.SessionRequest(
        chunk=pb.SessionChunk(inputs=pb.FloatArray(shape=[1, FEATURES], values=[0.5] * FEATURES))
    ).SerializeToString()
    expected = "request: not a valid rnnserve.v1.SessionRequest message"
    # The first message, then one after the session opened (and a chunk never read).
    code, details, replies = await _stream_outcome(session(iter([NOT_A_MESSAGE, chunk])))
    assert (code, details, replies) == (grpc.StatusCode.INVALID_ARGUMENT, expected, [])
    code, details, replies = await _stream_outcome(
        session(iter([opening, chunk, NOT_A_MESSAGE, chunk]))
    )
    assert (code, details) == (grpc.StatusCode.INVALID_ARGUMENT, expected)
    events = [pb.SessionResponse.FromString(r).WhichOneof("event") for r in replies]
    assert events == ["opened", "chunk"]
    failed = {"protocol": "grpc", "endpoint": "session_chunk", "outcome": "invalid_input"}
    assert _sample(served, "rnnserve_requests_total", model="enc", version="1", **failed) == 1


async def test_a_stream_infer_message_that_does_not_parse_is_answered_inline(
    served: Served,
) -> None:
    # NOTE: as any failed request of this stream (Triton's convention): the others still run.
    stream = served.channel.stream_stream("/inference.GRPCInferenceService/ModelStreamInfer")
    good = [_v2_features_request(_features(1, seed=s), raw=True) for s in range(2)]
    for i, request in enumerate(good):
        request.id = f"ok-{i}"
    sent = [good[0].SerializeToString(), NOT_A_MESSAGE, good[1].SerializeToString()]
    code, details, raw = await _stream_outcome(stream(iter(sent)))
    assert code == grpc.StatusCode.OK, details
    answers = {
        a.infer_response.id: a for a in (v2.ModelStreamInferResponse.FromString(r) for r in raw)
    }
    assert set(answers) == {"ok-0", "ok-1", ""}
    assert answers[""].error_message == "request: not a valid inference.ModelInferRequest message"
    for i in range(2):
        assert not answers[f"ok-{i}"].error_message
        assert answers[f"ok-{i}"].infer_response.outputs[0].name == "ENCODING"


_TRITON_CLIENT = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import tritonclient.grpc as tc

    client = tc.InferenceServerClient(sys.argv[1])
    batch = np.array(json.loads(sys.argv[2]), dtype=np.float32)
    x = tc.InferInput("INPUT", list(batch.shape), "FP32")
    x.set_data_from_numpy(batch)
    result = client.infer("enc", [x], outputs=[tc.InferRequestedOutput("ENCODING"),
                                               tc.InferRequestedOutput("LABELS")])
    meta = client.get_model_metadata("enc", as_json=True)

    # ModelStreamInfer: one request per sequence over one stream, answers by request id.
    import queue
    answers = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    for i in range(len(batch)):
        one = tc.InferInput("INPUT", [1, *batch.shape[1:]], "FP32")
        one.set_data_from_numpy(batch[i : i + 1])
        client.async_stream_infer("enc", [one], request_id=str(i))
    streamed = {}
    for _ in range(len(batch)):
        answer, error = answers.get(timeout=30)
        assert error is None, error
        streamed[answer.get_response().id] = answer.as_numpy("ENCODING")[0].tolist()
    client.stop_stream()
    print(json.dumps({
        "streamed": [streamed[str(i)] for i in range(len(batch))],
        "live": client.is_server_live(),
        "ready": client.is_server_ready(),
        "model_ready": client.is_model_ready("enc"),
        "inputs": [i["name"] for i in meta["inputs"]],
        "encoding": result.as_numpy("ENCODING").tolist(),
        "labels": [b.decode() for b in result.as_numpy("LABELS").ravel()],
        "server": client.get_server_metadata(as_json=True)["name"],
    }))
    """
)


async def test_independent_triton_client(served: Served) -> None:
    # NOTE: a separate process: tritonclient's and our inference.* protos share symbol names,
    # which one protobuf descriptor pool cannot hold together.
    batch = np.random.default_rng(7).normal(size=(3, 5, FEATURES)).astype(np.float32)
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _TRITON_CLIENT,
        f"127.0.0.1:{served.port}",
        json.dumps(batch.tolist()),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, err.decode()
    answer = json.loads(out)
    assert answer["live"] and answer["ready"] and answer["model_ready"]
    assert answer["inputs"] == ["INPUT", "LENGTHS"] and answer["server"] == "rnnserve"
    expected, scores = _direct_encode(served.repository, "enc", list(torch.from_numpy(batch)))
    np.testing.assert_allclose(np.array(answer["encoding"]), expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.array(answer["streamed"]), expected, rtol=1e-4, atol=1e-5)
    assert scores is not None
    assert answer["labels"] == [LABELS[i] for i in scores.argmax(axis=1)]


# --- the hot RPCs on raw bytes (service/grpc_api/raw_messages.py) ----------------------------


def _v2_infer_message(model: str, sequence: np.ndarray) -> v2.ModelInferRequest:
    request = v2.ModelInferRequest(model_name=model, id="call-1")
    request.inputs.add(name="INPUT", datatype="FP32", shape=[1, *sequence.shape])
    request.raw_input_contents.append(sequence.astype("<f4").tobytes())
    return request


async def test_hot_answers_are_the_bytes_protobuf_writes(served: Served) -> None:
    # A client without deserialisers gets the answer's bytes: protobuf writes the same bytes
    # for the message they parse to.
    sequences = _features(3, seed=4)
    encode = served.channel.unary_unary("/rnnserve.v1.RnnServe/Encode")
    answer = await encode(_encode_message("enc", sequences).SerializeToString())
    parsed = pb.EncodeResponse.FromString(answer)
    assert parsed.SerializeToString() == answer
    assert (parsed.model, parsed.version, len(parsed.encodings)) == ("enc", 1, 3)
    assert list(parsed.labels) and len(parsed.scores) == 3
    infer = served.channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
    answer = await infer(_v2_infer_message("enc", sequences[0]).SerializeToString())
    reply = v2.ModelInferResponse.FromString(answer)
    assert reply.SerializeToString() == answer
    assert (reply.model_name, reply.model_version, reply.id) == ("enc", "1", "call-1")


async def test_an_encode_request_in_any_layout_gets_the_same_answer(served: Served) -> None:
    # The same sequence as packed floats (read from the bytes) and unpacked (protobuf's path).
    sequence = _features(1, seed=5)[0]
    packed = _encode_message("enc", [sequence]).SerializeToString()
    shape = bytes([0x0A, 2, sequence.shape[0], sequence.shape[1]])
    values = b"".join(b"\x15" + v.tobytes() for v in sequence.astype("<f4").ravel())
    array = shape + values
    inputs = b"\x0a" + _varint(len(array)) + array
    unpacked = b"\x0a\x03enc\x1a" + _varint(len(inputs)) + inputs
    assert pb.EncodeRequest.FromString(unpacked) == pb.EncodeRequest.FromString(packed)
    encode = served.channel.unary_unary("/rnnserve.v1.RnnServe/Encode")
    assert await encode(unpacked) == await encode(packed)


def _varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


@pytest.mark.parametrize("rpc", ["Encode", "ModelInfer"])
async def test_a_cancelled_hot_call_is_counted_once_and_never_computed(
    served: Served, rpc: str
) -> None:
    # "slow" closes a batch only after 3 s while the device is busy: the call waits queued.
    sequence = _features(1, seed=6)[0]
    labels = {"model": "slow", "version": "1", "kind": "encode"}
    batches = _sample(served, "rnnserve_batch_size_count", **labels)
    async with device_held(served.engine):
        if rpc == "Encode":
            call: Any = served.api.Encode(_encode_message("slow", [sequence]))
        else:
            call = served.v2.ModelInfer(_v2_infer_message("slow", sequence))
        await eventually(lambda: _sample(served, "rnnserve_queue_depth", **labels) == 1)
        call.cancel()
        endpoint = "encode" if rpc == "Encode" else "infer"
        protocol = "grpc" if rpc == "Encode" else "v2-grpc"
        counted = {"model": "slow", "version": "", "protocol": protocol, "endpoint": endpoint}
        await eventually(
            lambda: _sample(served, "rnnserve_requests_total", **counted, outcome="cancelled") == 1
        )
    dropped = {"model": "slow", "version": "1", "reason": "cancelled"}
    await eventually(lambda: _sample(served, "rnnserve_dropped_sequences_total", **dropped) == 1)
    assert _sample(served, "rnnserve_batch_size_count", **labels) == batches, "computed"


@pytest.mark.parametrize("rpc", ["Encode", "ModelInfer"])
async def test_a_hot_calls_grpc_deadline_ends_it_before_compute(served: Served, rpc: str) -> None:
    # "slow" closes a batch only after 3 s while the device is busy: the call's own gRPC
    # deadline (no timeout_ms) ends it in the queue, and its sequence is never computed.
    sequence = _features(1, seed=7)[0]
    labels = {"model": "slow", "version": "1", "kind": "encode"}
    batches = _sample(served, "rnnserve_batch_size_count", **labels)
    async with device_held(served.engine):
        if rpc == "Encode":
            call: Any = served.api.Encode(_encode_message("slow", [sequence]), timeout=0.3)
        else:
            call = served.v2.ModelInfer(_v2_infer_message("slow", sequence), timeout=0.3)
        code, _ = await _code(call)
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    await eventually(lambda: _sample(served, "rnnserve_queue_depth", **labels) == 0)
    assert _sample(served, "rnnserve_batch_size_count", **labels) == batches, "computed"
