"""The gRPC edge against a real grpc.aio server: what a hostile or careless client can cost.

Messages refused by their value and field counts before parsing, refused calls that leave
nothing behind, answers refused (and counted) before they are built, ModelStreamInfer reading no
further ahead than its unread answers allow, made-up versions adding no metric series.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import tracemalloc
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from rnnserve_client.proto.inference import grpc_service_pb2 as v2
from rnnserve_client.proto.inference import grpc_service_pb2_grpc as v2_grpc
from rnnserve_client.proto.rnnserve.v1 import rnnserve_pb2 as pb
from rnnserve_client.proto.rnnserve.v1 import rnnserve_pb2_grpc as pb_grpc
from service.core.engine import Engine
from service.core.metrics import Metrics
from service.core.settings import Settings
from service.grpc_api.server import create_grpc_server
from tests.factories import write_model

pytestmark = pytest.mark.timeout(120)

FEATURES = 4
HIDDEN = 8
UNLIMITED = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]


@dataclass
class Served:
    engine: Engine
    metrics: Metrics
    channel: grpc.aio.Channel

    @property
    def api(self) -> pb_grpc.RnnServeStub:
        return pb_grpc.RnnServeStub(self.channel)

    @property
    def v2(self) -> v2_grpc.GRPCInferenceServiceStub:
        return v2_grpc.GRPCInferenceServiceStub(self.channel)

    def count(self, **labels: str) -> float:
        """Requests counted with these labels (summed over the others)."""
        total = 0.0
        for family in self.metrics.registry.collect():
            for sample in family.samples:
                if sample.name == "rnnserve_requests_total" and labels.items() <= (
                    sample.labels.items()
                ):
                    total += sample.value
        return total


@contextlib.asynccontextmanager
async def served(repository: Path, **overrides: Any) -> AsyncIterator[Served]:
    settings = Settings(
        repository=repository,
        grpc_port=0,
        device="cpu",
        cpu_threads=1,
        drain_grace_s=1.0,
        **overrides,
    )
    metrics = Metrics(CollectorRegistry())
    engine = Engine(settings, metrics)
    server = create_grpc_server(engine, settings, metrics)
    port = await server.start()
    await engine.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=UNLIMITED) as channel:
            yield Served(engine, metrics, channel)
    finally:
        await server.stop(0)
        await engine.drain(1.0)


@pytest.fixture
def repository(tmp_path: Path) -> Path:
    write_model(tmp_path, "enc", input_size=FEATURES, hidden_size=HIDDEN)
    write_model(tmp_path, "tok", input_type="tokens", hidden_size=HIDDEN)
    return tmp_path


async def _refusal(call: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await call
    return refused.value.code(), refused.value.details() or ""


def _tokens(count: int) -> v2.ModelInferRequest:
    request = v2.ModelInferRequest(model_name="tok")
    tensor = request.inputs.add(name="TOKENS", datatype="INT64", shape=[1, count])
    tensor.contents.int64_contents.extend([0] * count)
    return request


async def test_a_message_of_too_many_values_is_refused_before_parsing(repository: Path) -> None:
    async with served(repository, max_request_values=100_000) as server:
        code, details = await _refusal(server.v2.ModelInfer(_tokens(2_000_000)))
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert details.startswith("request: about 2,000,0") and "100,000" in details
        texts = pb.EncodeRequest(model="enc")
        texts.texts.texts.extend([""] * 1_000_000)
        code, details = await _refusal(server.api.Encode(texts))
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert details.startswith("request: more than 8,192 fields")
        # Counted under their RPCs, as invalid input (with blank labels: never parsed).
        assert server.count(endpoint="infer", outcome="invalid_input", model="") == 1
        assert server.count(endpoint="encode", outcome="invalid_input", model="") == 1
        # Within the limit: parsed, and refused by the model's own limits instead.
        code, details = await _refusal(server.v2.ModelInfer(_tokens(90_000)))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "max_sequence_length" in details


async def test_a_refused_call_leaves_nothing_behind(repository: Path) -> None:
    # A large message refused after parsing (its input has a wrong name). With the collector
    # off, only what reference counting frees is freed: nothing of the call may be kept.
    request = v2.ModelInferRequest(model_name="enc")
    request.inputs.add(name="WRONG", datatype="FP32", shape=[1, 500_000, FEATURES])
    request.raw_input_contents.append(np.zeros(500_000 * FEATURES, np.float32).tobytes())
    async with served(repository) as server:
        code, _ = await _refusal(server.v2.ModelInfer(request))
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        gc.collect()
        gc.disable()
        tracemalloc.start()
        try:
            for _ in range(3):
                await _refusal(server.v2.ModelInfer(request))
            await asyncio.sleep(0.1)
            kept, _ = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
            gc.enable()
    assert kept < 2_000_000, f"{kept:,} bytes kept after three refused 8 MB calls"


async def test_an_answer_over_the_limit_is_refused_before_compute(repository: Path) -> None:
    # 4096 bytes: 1024 numbers at 4 bytes; per-step encodings of 8 numbers, 2 rows × 100 steps.
    async with served(repository, max_answer_bytes=4096) as server:
        request = pb.EncodeRequest(model="enc", pooling="none")
        for _ in range(2):
            request.inputs.sequences.add(shape=[100, FEATURES], values=[0.5] * 100 * FEATURES)
        code, details = await _refusal(server.api.Encode(request))
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert "6,400 bytes" in details and "4,096 bytes (--max-answer-bytes)" in details
        infer = v2.ModelInferRequest(model_name="enc")
        infer.parameters["pooling"].string_param = "none"
        infer.inputs.add(name="INPUT", datatype="FP32", shape=[2, 100, FEATURES])
        infer.raw_input_contents.append(np.zeros(800, np.float32).tobytes())
        code, details = await _refusal(server.v2.ModelInfer(infer))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "6,400 bytes" in details
        request.pooling = "mean"
        assert len((await server.api.Encode(request)).encodings) == 2
        assert server.count(model="enc", outcome="invalid_input") == 2
        assert server.count(model="enc", outcome="success") == 1


async def test_an_answer_over_the_message_limit_is_refused_and_counted(tmp_path: Path) -> None:
    # The listing of 12 models (their architectures) is larger than a 1 KiB message: grpc would
    # fail it after the handler returned, and the call would have counted as a success.
    for k in range(12):
        write_model(tmp_path, f"model-{k:02d}", input_size=FEATURES, hidden_size=HIDDEN)
    async with served(tmp_path, grpc_max_message_bytes=1024) as server:
        code, details = await _refusal(server.api.ListModels(pb.ListModelsRequest()))
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert details.startswith("answer: the answer takes") and "1,024" in details
        assert server.count(endpoint="list_models", outcome="invalid_input") == 1
        assert server.count(endpoint="list_models", outcome="success") == 0
        assert (await server.api.GetModel(pb.GetModelRequest(name="model-00"))).name == "model-00"


async def test_stream_infer_reads_no_further_than_its_unread_answers(repository: Path) -> None:
    # Answers of ~1 MB each (4 rows × 8,000 steps × 8 numbers): the client reads none at first.
    request = v2.ModelInferRequest(model_name="enc")
    request.parameters["pooling"].string_param = "none"
    request.inputs.add(name="INPUT", datatype="FP32", shape=[4, 8000, FEATURES])
    request.raw_input_contents.append(np.zeros(4 * 8000 * FEATURES, np.float32).tobytes())
    write_model(
        repository, "long", input_size=FEATURES, hidden_size=HIDDEN,
        serving={"max_sequence_length": 8000},
    )  # fmt: skip
    request.model_name = "long"
    async with served(repository, max_stream_pending=2) as server:
        call = server.v2.ModelStreamInfer()
        for _ in range(12):
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(call.write(request), 1.0)
        await asyncio.sleep(2.0)
        ran = server.count(model="long", endpoint="stream_infer")
        assert 2 <= ran < 12
        # Nothing is lost: once read, every request is answered.
        answers = 0
        async with asyncio.timeout(60):
            while answers < 12:
                answer = await call.read()
                assert not answer.error_message, answer.error_message
                answers += 1
        call.cancel()
        assert server.count(model="long", endpoint="stream_infer", outcome="success") == 12


async def test_made_up_versions_add_no_metric_series(repository: Path) -> None:
    async with served(repository) as server:
        for name in ("made-up-1", "made-up-2"):
            assert not (await server.v2.ModelReady(v2.ModelReadyRequest(name=name))).ready
        for version in range(100_000, 100_010):
            ready = v2.ModelReadyRequest(name="enc", version=str(version))
            assert not (await server.v2.ModelReady(ready)).ready
            meta = v2.ModelMetadataRequest(name="enc", version=str(version))
            await _refusal(server.v2.ModelMetadata(meta))
            encode = pb.EncodeRequest(model="enc", version=version)
            encode.inputs.sequences.add(shape=[1, FEATURES], values=[0.5] * FEATURES)
            await _refusal(server.api.Encode(encode))
        versions = {
            sample.labels["version"]
            for family in server.metrics.registry.collect()
            for sample in family.samples
            if "version" in sample.labels
        }
        assert versions <= {"", "1"}
        assert server.count(model="enc", version="", endpoint="encode") == 10
        assert server.count(model="", endpoint="model_ready") == 2
