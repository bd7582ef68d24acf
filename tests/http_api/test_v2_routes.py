"""The Open Inference Protocol (V2) REST endpoints against a real server, with Triton's client."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import cast

import grpc
import httpx
import numpy as np
import orjson
import pytest
import tritonclient.http as triton
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry
from tritonclient.utils import InferenceServerException

from rnnserve_client.proto.inference import grpc_service_pb2 as v2
from rnnserve_client.proto.inference.grpc_service_pb2_grpc import GRPCInferenceServiceStub
from service.core.metrics import Metrics
from service.core.types import GenerateRequest
from service.grpc_api.server import create_grpc_server
from service.http_api import json_codecs as codecs
from service.inference_protocol import tensors as v2_tensors
from tests.factories import write_model
from tests.support import (
    TOKEN,
    LiveServer,
    decode_v2_outputs,
    live_server,
    metric_value,
    write_test_repository,
)

AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    repository = tmp_path_factory.mktemp("v2-repository")
    write_test_repository(repository)
    with live_server(repository, management_enabled=True, management_token=TOKEN) as live:
        yield live


@pytest.fixture(scope="module")
def client(server: LiveServer) -> Iterator[triton.InferenceServerClient]:
    c = triton.InferenceServerClient(url=f"127.0.0.1:{server.port}")
    yield c
    c.close()


@contextmanager
def v2_grpc_on(live: LiveServer) -> Iterator[GRPCInferenceServiceStub]:
    """The V2 gRPC front-end on the live server's engine (same loop), and a client stub."""
    settings = live.settings.model_copy(update={"host": "127.0.0.1", "grpc_port": 0})
    grpc_server = create_grpc_server(live.engine, settings, Metrics(CollectorRegistry()))
    port = live.call(grpc_server.start())
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield GRPCInferenceServiceStub(channel)
    finally:
        channel.close()
        live.call(grpc_server.stop(0))


@pytest.fixture(scope="module")
def v2_grpc(server: LiveServer) -> Iterator[GRPCInferenceServiceStub]:
    with v2_grpc_on(server) as stub:
        yield stub


@pytest.fixture(scope="module")
def http(server: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c


def rest_encode(http: httpx.Client, model: str, seqs: list[np.ndarray], version: int) -> np.ndarray:
    r = http.post(
        f"/v1/models/{model}/versions/{version}/encode", json={"inputs": [s.tolist() for s in seqs]}
    )
    assert r.status_code == 200, r.text
    return np.array(r.json()["encodings"], dtype=np.float32)


def test_health_and_metadata(client: triton.InferenceServerClient) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("feat")
    assert client.is_model_ready("feat", model_version="1")
    assert not client.is_model_ready("broken")
    assert not client.is_model_ready("feat", model_version="9")
    server = client.get_server_metadata()
    assert server["name"] == "rnnserve" and "binary_tensor_data" in server["extensions"]
    meta = client.get_model_metadata("feat")
    # Every version a client may ask for (KServe V2), not only the serving one.
    assert meta["versions"] == ["1", "2"]
    assert {"name": "INPUT", "datatype": "FP32", "shape": [-1, -1, 8]} in meta["inputs"]
    assert [o["name"] for o in meta["outputs"]] == ["ENCODING", "SCORES", "LABELS"]
    seq2seq = client.get_model_metadata("translit", model_version="1")
    # TEXT is [batch] strings: nothing to trim, so no LENGTHS (infer refuses one).
    assert [i["name"] for i in seq2seq["inputs"]] == ["TEXT"]
    assert [o["name"] for o in seq2seq["outputs"]] == [
        "OUTPUT_TOKENS",
        "OUTPUT_LENGTHS",
        "OUTPUT_TEXT",
    ]
    with pytest.raises(InferenceServerException, match="nope"):
        client.get_model_metadata("nope")


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_infer_features_with_lengths(
    client: triton.InferenceServerClient, http: httpx.Client, binary: bool
) -> None:
    rng = np.random.default_rng(3)
    batch = rng.standard_normal((3, 6, 8)).astype(np.float32)
    lengths = np.array([6, 2, 4], dtype=np.int64)
    inputs = [
        triton.InferInput("INPUT", [3, 6, 8], "FP32"),
        triton.InferInput("LENGTHS", [3], "INT64"),
    ]
    inputs[0].set_data_from_numpy(batch, binary_data=binary)
    inputs[1].set_data_from_numpy(lengths, binary_data=binary)
    outputs = [
        triton.InferRequestedOutput(name, binary_data=binary)
        for name in ("ENCODING", "SCORES", "LABELS")
    ]
    result = client.infer("feat", inputs, model_version="1", outputs=outputs)
    encoding = result.as_numpy("ENCODING")
    assert encoding.dtype == np.float32 and encoding.shape == (3, 16)
    expected = rest_encode(http, "feat", [batch[b, :n] for b, n in enumerate(lengths)], 1)
    np.testing.assert_allclose(encoding, expected, rtol=1e-5, atol=1e-6)
    scores = result.as_numpy("SCORES")
    labels = [x.decode() if isinstance(x, bytes) else x for x in result.as_numpy("LABELS")]
    assert labels == [["neg", "pos"][i] for i in scores.argmax(axis=1)]
    assert result.get_response()["model_version"] == "1"


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_infer_seq2seq_text(
    client: triton.InferenceServerClient, http: httpx.Client, binary: bool
) -> None:
    texts = np.array([b"abc", b"hello"], dtype=np.object_)
    inp = triton.InferInput("TEXT", [2], "BYTES")
    inp.set_data_from_numpy(texts, binary_data=binary)
    names = ("OUTPUT_TOKENS", "OUTPUT_LENGTHS", "OUTPUT_TEXT")
    outputs = [triton.InferRequestedOutput(n, binary_data=binary) for n in names]
    result = client.infer("translit", [inp], outputs=outputs)
    expected = http.post("/v1/models/translit/generate", json={"texts": ["abc", "hello"]}).json()
    tokens = result.as_numpy("OUTPUT_TOKENS")
    lengths = result.as_numpy("OUTPUT_LENGTHS")
    text = [t.decode() if isinstance(t, bytes) else t for t in result.as_numpy("OUTPUT_TEXT")]
    for b, out in enumerate(expected["outputs"]):
        assert tokens[b, : lengths[b]].tolist() == out["tokens"]
        assert (tokens[b, lengths[b] :] == -1).all()
        assert text[b] == out["text"]


def test_infer_tokens_json_default_outputs(client: triton.InferenceServerClient) -> None:
    inp = triton.InferInput("TOKENS", [2, 3], "INT64")
    inp.set_data_from_numpy(np.array([[1, 2, 3], [4, 5, 6]], dtype=np.int64), binary_data=False)
    result = client.infer("tok", [inp])
    assert result.as_numpy("ENCODING").shape == (2, 16)


def test_binary_request_without_content_type(http: httpx.Client) -> None:
    batch = np.ones((1, 2, 8), dtype=np.float32)
    head = orjson.dumps(
        {
            "inputs": [
                {
                    "name": "INPUT",
                    "datatype": "FP32",
                    "shape": [1, 2, 8],
                    "parameters": {"binary_data_size": batch.nbytes},
                }
            ],
            "parameters": {"binary_data_output": True},
        }
    )
    r = http.post(
        "/v2/models/feat/infer",
        content=head + batch.tobytes(),
        headers={codecs.HEADER_LENGTH: str(len(head))},
    )
    assert "content-type" not in r.request.headers
    assert r.status_code == 200, r.text
    n = int(r.headers[codecs.HEADER_LENGTH])
    header, tail = codecs.split_v2_body(r.content, str(n))
    decoded = {t.name: t.data for t in codecs.decode_v2_inputs({"inputs": header["outputs"]}, tail)}
    expected = rest_encode(http, "feat", [batch[0]], 2)
    assert isinstance(decoded["ENCODING"], np.ndarray)
    np.testing.assert_allclose(decoded["ENCODING"], expected, rtol=1e-5, atol=1e-6)


def tensor(name: str, datatype: str, shape: list[int], data: list[object]) -> dict[str, object]:
    return {"name": name, "datatype": datatype, "shape": shape, "data": data}


def body(*inputs: dict[str, object], **extra: object) -> dict[str, object]:
    return {"inputs": list(inputs), **extra}


ONE_STEP = tensor("INPUT", "FP32", [1, 1, 8], [0.0] * 8)


@pytest.mark.parametrize(
    ("model", "request_body", "status", "fragment"),
    [
        ("nope", body(tensor("INPUT", "FP32", [1], [1])), 404, "nope"),
        ("feat", body(tensor("X", "FP32", [1], [1])), 400, "INPUT"),
        ("feat", body(tensor("INPUT", "FP32", [1, 1, 7], [0] * 7)), 400, "8"),
        ("feat", body(tensor("INPUT", "FP32", [1, 8], [0] * 8)), 400, "[batch, time, features]"),
        ("feat", body(tensor("INPUT", "FP32", [9, 1, 8], [0] * 72)), 400, "at most 8"),
        ("feat", body(tensor("INPUT", "FP32", [1, 1, 8], [0] * 9)), 400, "holds 8 elements"),
        ("tok", body(tensor("TOKENS", "INT64", [1, 2], [1, 99])), 400, "99"),
        ("short", body(tensor("INPUT", "FP32", [1, 17, 4], [0] * 68)), 400, "16"),
        ("words", body(tensor("TEXT", "BYTES", [1], ["x" * 41])), 400, "40"),
        ("broken", body(tensor("INPUT", "FP32", [1, 1, 4], [0] * 4)), 503, ""),
        ("feat", body(ONE_STEP, outputs=[{"name": "Y"}]), 400, "Y"),
        ("feat", body(ONE_STEP, tensor("LENGTHS", "INT64", [1], [3])), 400, "1..1"),
        ("feat", body(ONE_STEP, parameters={"pooling": "sum"}), 400, "parameters.pooling"),
        ("feat", body(ONE_STEP, parameters={"timeout_ms": "soon"}), 400, "parameters.timeout_ms"),
        (
            "feat",
            body(ONE_STEP, parameters={"timeout_ms": 3_600_001}),
            400,
            "parameters.timeout_ms: must be greater than 0 and at most 3600000 ms",
        ),
        (
            "feat",
            body(ONE_STEP, parameters={"timeout_ms": 0}),
            400,
            "parameters.timeout_ms: must be greater than 0 and at most 3600000 ms",
        ),
        (
            "translit",
            body(tensor("TEXT", "BYTES", [1], ["ab"]), parameters={"beam_size": 17}),
            400,
            "beam_size: must be between 1 and 16, got 17",
        ),
        ("feat", body(ONE_STEP, parameters=[]), 400, "parameters: expected an object"),
        ("feat", body(ONE_STEP, parameters=""), 400, "parameters: expected an object"),
        (
            "feat",
            body(ONE_STEP, outputs=[{"name": "ENCODING", "parameters": 0}]),
            400,
            "outputs[0]",
        ),
        ("feat", body({**ONE_STEP, "parameters": []}), 400, "inputs[0].parameters"),
    ],
)
def test_infer_errors(
    http: httpx.Client, model: str, request_body: dict[str, object], status: int, fragment: str
) -> None:
    r = http.post(f"/v2/models/{model}/infer", content=orjson.dumps(request_body))
    assert r.status_code == status, r.text
    error = r.json()
    assert set(error) == {"error"} and isinstance(error["error"], str)
    assert fragment in error["error"]


def test_deadline_is_504(http: httpx.Client) -> None:
    body = {"inputs": [ONE_STEP], "parameters": {"timeout_ms": 0.001}}
    r = http.post("/v2/models/feat/infer", content=orjson.dumps(body))
    assert r.status_code == 504
    assert isinstance(r.json()["error"], str)


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
async def test_client_gone_is_never_computed(server: LiveServer, binary: bool) -> None:
    data = np.full((1, 1, 4), 0.5, dtype=np.float32)
    spec: dict[str, object] = {"name": "INPUT", "datatype": "FP32", "shape": [1, 1, 4]}
    if binary:
        head = orjson.dumps({"inputs": [{**spec, "parameters": {"binary_data_size": 16}}]})
        body, extra = (
            head + data.tobytes(),
            b"%s: %d\r\n" % (codecs.HEADER_LENGTH.encode(), len(head)),
        )
    else:
        body, extra = orjson.dumps({"inputs": [{**spec, "data": data.ravel().tolist()}]}), b""
    async with httpx.AsyncClient(base_url=server.url, timeout=60) as c:
        before = (await c.get("/metrics")).text
        # Keep the device busy with long sequences (a batch each: a batch's step budget is
        # max_batch_size × 128), so that the next request waits in its queue.
        busy = asyncio.create_task(
            c.post("/v1/models/heavy/encode", json={"tokens": [[1, 2, 3, 4] * 2000] * 3})
        )
        await asyncio.sleep(0.05)
        _reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(
            b"POST /v2/models/slow/infer HTTP/1.1\r\nHost: test\r\n%s"
            b"Content-Length: %d\r\n\r\n%s" % (extra, len(body), body)
        )
        await writer.drain()
        # NOTE: the heavy call takes ~300 ms here: leave well before it ends.
        await asyncio.sleep(0.02)
        writer.close()
        assert (await busy).status_code == 200
        await asyncio.sleep(0.1)
        after = (await c.get("/metrics")).text
    cancelled = {"model": "slow", "protocol": "v2-rest", "outcome": "cancelled"}
    assert metric_value(after, "rnnserve_requests_total", **cancelled) == 1 + metric_value(
        before, "rnnserve_requests_total", **cancelled
    )
    computed = {"model": "slow"}
    assert metric_value(after, "rnnserve_batch_size_sum", **computed) == metric_value(
        before, "rnnserve_batch_size_sum", **computed
    )


def test_nan_in_binary_features_is_rejected(http: httpx.Client) -> None:
    batch = np.zeros((1, 2, 8), dtype=np.float32)
    batch[0, 1, 3] = np.nan
    head = orjson.dumps(
        {
            "inputs": [
                {
                    "name": "INPUT",
                    "datatype": "FP32",
                    "shape": [1, 2, 8],
                    "parameters": {"binary_data_size": batch.nbytes},
                }
            ]
        }
    )
    r = http.post(
        "/v2/models/feat/infer",
        content=head + batch.tobytes(),
        headers={codecs.HEADER_LENGTH: str(len(head))},
    )
    assert r.status_code == 400
    assert "NaN" in r.json()["error"]


def test_repository_extension(client: triton.InferenceServerClient, http: httpx.Client) -> None:
    assert http.post("/v2/repository/index").status_code == 401
    index = client.get_model_repository_index(headers=AUTH)
    states = {(e["name"], e["version"]): e["state"] for e in index}
    assert states[("feat", "1")] == "READY" and states[("broken", "1")] == "FAILED"
    client.unload_model("tok", headers=AUTH)
    assert not client.is_model_ready("tok")
    client.load_model("tok", headers=AUTH)
    assert client.is_model_ready("tok")
    r = http.post(
        "/v2/repository/models/tok/load",
        headers=AUTH,
        content=orjson.dumps({"parameters": {"file:1/model.safetensors": "AAAA"}}),
    )
    assert r.status_code == 400 and "parameters" in r.json()["error"]
    # A name with a path separator is bad input (DESIGN §2), named as such.
    for name in ("..%2Fetc", "a%2Fb", "a%5Cb", "x" * 201, "x" * 256):
        r = http.post(f"/v2/repository/models/{name}/load", headers=AUTH)
        assert r.status_code == 400, (name, r.text)
        assert r.json()["error"].startswith("name: a model name is 1–200 letters"), name


def test_v2_metrics_protocol_label(
    http: httpx.Client, client: triton.InferenceServerClient
) -> None:
    inp = triton.InferInput("TOKENS", [1, 2], "INT64")
    inp.set_data_from_numpy(np.array([[1, 2]], dtype=np.int64))
    client.infer("tok", [inp])
    text = http.get("/metrics").text
    assert 'protocol="v2-rest"' in text and 'endpoint="infer"' in text


def test_server_version_is_the_package_version_on_rest_and_grpc(
    client: triton.InferenceServerClient, v2_grpc: GRPCInferenceServiceStub
) -> None:
    installed = metadata.version("rnnserve")
    assert client.get_server_metadata()["version"] == installed
    assert v2_grpc.ServerMetadata(v2.ServerMetadataRequest()).version == installed


@pytest.mark.parametrize("model", ["feat", "tok", "words", "translit"])
def test_rest_and_grpc_model_metadata_agree(
    http: httpx.Client, v2_grpc: GRPCInferenceServiceStub, model: str
) -> None:
    rest = http.get(f"/v2/models/{model}").json()
    answer = v2_grpc.ModelMetadata(v2.ModelMetadataRequest(name=model))
    grpc_meta = {
        "name": answer.name,
        "versions": list(answer.versions),
        "platform": answer.platform,
        "inputs": [
            {"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in answer.inputs
        ],
        "outputs": [
            {"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in answer.outputs
        ],
        "parameters": {key: p.string_param for key, p in answer.parameters.items()},
    }
    assert rest == grpc_meta
    assert rest["parameters"]["precision.encoder"] == "float32"  # the server runs float32


def test_rest_and_grpc_timeout_limits_agree(
    http: httpx.Client, v2_grpc: GRPCInferenceServiceStub
) -> None:
    for timeout_ms in (-1, 0, 3_600_001):
        r = http.post(
            "/v2/models/feat/infer",
            content=orjson.dumps(body(ONE_STEP, parameters={"timeout_ms": timeout_ms})),
        )
        assert r.status_code == 400
        request = v2.ModelInferRequest(model_name="feat")
        request.inputs.add(name="INPUT", datatype="FP32", shape=[1, 1, 8]).contents.fp32_contents[
            :
        ] = [0.0] * 8
        request.parameters["timeout_ms"].int64_param = timeout_ms
        with pytest.raises(grpc.RpcError) as caught:
            v2_grpc.ModelInfer(request)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert caught.value.details() == r.json()["error"]


# --- one input check for both V2 wires (inference_protocol.requests.infer_sequences) ----------

_CONTENTS = {
    "FP32": "fp32_contents",
    "UINT8": "uint_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT64": "uint64_contents",
    "BYTES": "bytes_contents",
}


def v2_input(
    name: str, datatype: str, shape: list[int], data: np.ndarray | list[bytes] | None = None
) -> v2_tensors.V2Tensor:
    """One V2 input tensor to send over either wire; no data: zeros (or b"a") filling `shape`."""
    if data is None:
        count = math.prod(shape)
        data = (
            [b"a"] * count
            if datatype == "BYTES"
            else np.zeros(shape, v2_tensors.V2_DTYPES[datatype])
        )
    return v2_tensors.V2Tensor(name, datatype, shape, data)


def _raw(tensor: v2_tensors.V2Tensor) -> bytes:
    if isinstance(tensor.data, list):
        return v2_tensors.pack_bytes(tensor.data)
    return np.asarray(tensor.data, v2_tensors.V2_DTYPES[tensor.datatype]).tobytes()


def _raw_holds(tensor: v2_tensors.V2Tensor) -> bool:
    """Whether the tensor's values survive `_raw` (300 as UINT8 does not: it wraps to 44)."""
    if isinstance(tensor.data, list):
        return True
    return bool(
        (np.asarray(tensor.data, v2_tensors.V2_DTYPES[tensor.datatype]) == tensor.data).all()
    )


def rest_infer(
    http: httpx.Client, model: str, tensors: list[v2_tensors.V2Tensor], binary: bool
) -> httpx.Response:
    """POST the tensors as JSON data, or all as binary tensors after the JSON header."""
    specs: list[dict[str, object]] = []
    blobs: list[bytes] = []
    for t in tensors:
        spec: dict[str, object] = {"name": t.name, "datatype": t.datatype, "shape": t.shape}
        if binary:
            blobs.append(_raw(t))
            spec["parameters"] = {"binary_data_size": len(blobs[-1])}
        elif isinstance(t.data, list):
            spec["data"] = [item.decode() for item in t.data]
        else:
            spec["data"] = t.data.ravel().tolist()
        specs.append(spec)
    head = orjson.dumps({"inputs": specs})
    headers = {codecs.HEADER_LENGTH: str(len(head))} if binary else {}
    return http.post(f"/v2/models/{model}/infer", content=head + b"".join(blobs), headers=headers)


def grpc_infer_request(
    model: str, tensors: list[v2_tensors.V2Tensor], raw: bool
) -> v2.ModelInferRequest:
    """The same tensors as a V2 gRPC request, in raw_input_contents or typed contents."""
    request = v2.ModelInferRequest(model_name=model)
    for t in tensors:
        tensor = request.inputs.add(name=t.name, datatype=t.datatype, shape=t.shape)
        if raw:
            request.raw_input_contents.append(_raw(t))
        else:
            values = t.data if isinstance(t.data, list) else t.data.ravel().tolist()
            getattr(tensor.contents, _CONTENTS[t.datatype]).extend(values)
    return request


def _grpc_outcome(
    stub: GRPCInferenceServiceStub, request: v2.ModelInferRequest
) -> tuple[grpc.StatusCode, str, v2.ModelInferResponse | None]:
    try:
        return grpc.StatusCode.OK, "", stub.ModelInfer(request)
    except grpc.RpcError as exc:
        error = cast(grpc.Call, exc)
        return error.code(), error.details() or "", None


ONE_STEP_INPUT = v2_input("INPUT", "FP32", [1, 1, 8])
FEATURES_2x3 = v2_input("INPUT", "FP32", [2, 3, 8])
INTS = "['INT16', 'INT32', 'INT64', 'INT8', 'UINT16', 'UINT32', 'UINT8']"

# (model, input tensors, the field named, the message): the server's limit is 8 sequences.
BAD_V2_INPUTS = [
    pytest.param(
        "feat",
        [ONE_STEP_INPUT, v2_input("X", "FP32", [1])],
        "inputs[1].name",
        "unexpected input 'X'; this model takes INPUT and optional LENGTHS",
        id="unknown-input",
    ),
    pytest.param(
        "feat",
        [ONE_STEP_INPUT, ONE_STEP_INPUT],
        "inputs[1].name",
        "'INPUT' appears twice (first as inputs[0])",
        id="input-twice",
    ),
    pytest.param(
        "words",
        [v2_input("TEXT", "BYTES", [1]), v2_input("LENGTHS", "INT64", [1], np.ones(1, np.int64))],
        "inputs[1].name",
        "unexpected input 'LENGTHS'; this model takes TEXT",
        id="lengths-for-text",
    ),
    pytest.param(
        "feat",
        [v2_input("LENGTHS", "INT64", [1], np.ones(1, np.int64))],
        "inputs",
        "input 'INPUT' is required by this model",
        id="main-input-missing",
    ),
    pytest.param(
        "feat",
        [v2_input("INPUT", "INT32", [1, 1, 8])],
        "inputs[0].datatype",
        "INPUT must be ['FP16', 'FP32', 'FP64'], got INT32",
        id="features-not-float",
    ),
    pytest.param(
        "tok",
        [v2_input("TOKENS", "UINT64", [1, 2])],
        "inputs[0].datatype",
        f"TOKENS must be {INTS}, got UINT64",
        id="tokens-uint64",
    ),
    pytest.param(
        "words",
        [v2_input("TEXT", "INT64", [1])],
        "inputs[0].datatype",
        "TEXT must be BYTES, got INT64",
        id="text-not-bytes",
    ),
    pytest.param(
        "feat",
        [v2_input("INPUT", "FP32", [1, 8])],
        "inputs[0].shape",
        "INPUT must be [batch, time, features], got [1, 8]",
        id="features-ndim",
    ),
    pytest.param(
        "tok",
        [v2_input("TOKENS", "INT64", [2])],
        "inputs[0].shape",
        "TOKENS must be [batch, time], got [2]",
        id="tokens-ndim",
    ),
    pytest.param(
        "feat",
        [v2_input("INPUT", "FP32", [0, 1, 8])],
        "inputs[0].shape",
        "the batch needs at least 1 sequence, got 0",
        id="features-batch-0",
    ),
    pytest.param(
        "words",
        [v2_input("TEXT", "BYTES", [0])],
        "inputs[0].shape",
        "the batch needs at least 1 sequence, got 0",
        id="text-batch-0",
    ),
    pytest.param(
        "tok",
        [v2_input("TOKENS", "INT64", [9, 1])],
        "inputs[0].shape",
        "at most 8 sequences per request, got 9",
        id="tokens-over-limit",
    ),
    pytest.param(
        "words",
        [v2_input("TEXT", "BYTES", [9])],
        "inputs[0].shape",
        "at most 8 sequences per request, got 9",
        id="text-over-limit",
    ),
    pytest.param(
        "translit",
        [v2_input("TEXT", "BYTES", [9, 1])],
        "inputs[0].shape",
        "at most 8 sequences per request, got 9",
        id="seq2seq-over-limit",
    ),
    pytest.param(
        "feat",
        [FEATURES_2x3, v2_input("LENGTHS", "INT64", [1], np.array([3]))],
        "inputs[1].shape",
        "LENGTHS must be [2] (one per sequence), got [1]",
        id="lengths-shape",
    ),
    pytest.param(
        "feat",
        [FEATURES_2x3, v2_input("LENGTHS", "FP32", [2], np.array([3.0, 3.0]))],
        "inputs[1].datatype",
        f"LENGTHS must be {INTS}, got FP32",
        id="lengths-not-int",
    ),
    pytest.param(
        "feat",
        [FEATURES_2x3, v2_input("LENGTHS", "INT64", [2], np.array([0, 3]))],
        "inputs[1].data[0]",
        "length must be in 1..3, got 0",
        id="length-0",
    ),
    pytest.param(
        "feat",
        [FEATURES_2x3, v2_input("LENGTHS", "INT64", [2], np.array([3, 4]))],
        "inputs[1].data[1]",
        "length must be in 1..3, got 4",
        id="length-over-time",
    ),
    pytest.param(
        "words",
        [v2_input("TEXT", "BYTES", [2], [b"ok", b"\xff"])],
        "inputs[0].data[1]",
        "TEXT elements must be UTF-8",
        id="text-not-utf8",
    ),
    pytest.param(
        "words",
        [v2_input("TEXT", "BYTES", [1, 2])],
        "inputs[0].shape",
        "TEXT must be [batch] (or [batch, 1]), got [1, 2]",
        id="text-shape",
    ),
    # What the gRPC fuzz found (tests/grpc_api/test_fuzz.py), now one check for both wires
    # (tensors.tensor_elements, tensors.check_int_range): REST used to wrap such integers
    # around (300 as UINT8 was token 44) and answer such shapes with a 500.
    pytest.param(
        "tok",
        [v2_input("TOKENS", "UINT8", [1, 2], np.array([1, 300]))],
        "inputs[0].data[1]",
        "300 is outside the UINT8 range [0, 255]",
        id="uint8-300",
    ),
    pytest.param(
        "tok",
        [v2_input("TOKENS", "INT16", [1, 1], np.array([40000]))],
        "inputs[0].data[0]",
        "40000 is outside the INT16 range [-32768, 32767]",
        id="int16-40000",
    ),
    pytest.param(
        "feat",
        [v2_input("INPUT", "FP32", [0, 2**62, 8], np.zeros(0, np.float32))],
        "inputs[0].shape",
        "the non-zero dimensions must multiply to at most 2147483648, "
        "got [0, 4611686018427387904, 8]",
        id="empty-with-huge-dimensions",
    ),
    pytest.param(
        "feat",
        [v2_input("INPUT", "FP32", [1, -1, 8], np.zeros(0, np.float32))],
        "inputs[0].shape",
        "dimensions must be >= 0, got [1, -1, 8]",
        id="negative-dimension",
    ),
    pytest.param(
        "feat",
        [v2_input("INPUT", "FP32", [1] * 9)],
        "inputs[0].shape",
        "at most 8 dimensions, got 9",
        id="nine-dimensions",
    ),
]


@pytest.mark.parametrize("binary", [False, True], ids=["json+typed", "binary+raw"])
@pytest.mark.parametrize(("model", "tensors", "field", "message"), BAD_V2_INPUTS)
def test_rest_and_grpc_refuse_a_bad_v2_input_alike(
    http: httpx.Client,
    v2_grpc: GRPCInferenceServiceStub,
    binary: bool,
    model: str,
    tensors: list[v2_tensors.V2Tensor],
    field: str,
    message: str,
) -> None:
    if not binary and any(isinstance(t.data, list) and b"\xff" in t.data for t in tensors):
        pytest.skip("a JSON string is always UTF-8")
    if binary and not all(_raw_holds(t) for t in tensors):
        pytest.skip("raw bytes hold only values of the datatype")
    error = f"{field}: {message}"
    r = rest_infer(http, model, tensors, binary)
    assert (r.status_code, r.json()) == (400, {"error": error}), r.text
    code, details, _ = _grpc_outcome(v2_grpc, grpc_infer_request(model, tensors, raw=binary))
    assert (code, details) == (grpc.StatusCode.INVALID_ARGUMENT, error)


@pytest.mark.parametrize("version", ["²", "١", "+1", "%201", "1_0", "0", "1.0", "1" * 20])
def test_a_version_that_is_not_plain_digits_is_refused(http: httpx.Client, version: str) -> None:
    # NOTE: as gRPC's model_version (v2_grpc._version): a plain int path parameter would have
    # read "+1" and " 1" as 1 and "1_0" as 10.
    base = f"/v2/models/feat/versions/{version}"
    infer = http.post(f"{base}/infer", content=orjson.dumps(body(ONE_STEP)))
    v1 = http.post(f"/v1/models/feat/versions/{version}/encode", json={"inputs": [ONE_STEP]})
    for r in (http.get(base), http.get(f"{base}/ready"), infer):
        assert r.status_code == 400, r.text
        assert r.json()["error"].startswith("path.version: must be a positive integer"), r.text
    assert v1.status_code == 400, v1.text
    assert v1.json()["error"]["field"] == "path.version"
    assert v1.json()["error"]["type"] == "InvalidInput"


@settings(max_examples=30, deadline=None)
@given(
    batch=st.integers(0, 10),
    lengths=st.none() | st.lists(st.integers(-1, 4), max_size=10),
)
def test_rest_and_grpc_agree_on_any_batch_and_lengths(
    http: httpx.Client, v2_grpc: GRPCInferenceServiceStub, batch: int, lengths: list[int] | None
) -> None:
    features = np.arange(batch * 3 * 8, dtype=np.float32).reshape(batch, 3, 8) / 100
    tensors = [v2_input("INPUT", "FP32", [batch, 3, 8], features)]
    if lengths is not None:
        tensors.append(v2_input("LENGTHS", "INT64", [len(lengths)], np.array(lengths, np.int64)))
    r = rest_infer(http, "feat", tensors, binary=True)
    code, details, response = _grpc_outcome(v2_grpc, grpc_infer_request("feat", tensors, raw=True))
    # Both refusing a valid batch would agree too: 1-8 sequences, one length each in 1..3 is one.
    valid = 1 <= batch <= 8 and (
        lengths is None or (len(lengths) == batch and all(1 <= n <= 3 for n in lengths))
    )
    assert (r.status_code == 200) == valid, r.text
    if r.status_code != 200:
        assert (r.status_code, code) == (400, grpc.StatusCode.INVALID_ARGUMENT), r.text
        assert details == r.json()["error"]
        return
    assert code == grpc.StatusCode.OK and response is not None, details
    rest_encoding = np.array(r.json()["outputs"][0]["data"], np.float32)
    grpc_encoding = decode_v2_outputs(response)["ENCODING"].data
    assert isinstance(grpc_encoding, np.ndarray)
    np.testing.assert_allclose(grpc_encoding.ravel(), rest_encoding, rtol=1e-6, atol=1e-7)


def test_model_ready_is_false_on_rest_and_grpc_while_draining(tmp_path: Path) -> None:
    write_model(tmp_path, "translit", 1, task="seq2seq", input_type="text", max_length=8)
    with (
        live_server(tmp_path) as live,
        v2_grpc_on(live) as stub,
        httpx.Client(base_url=live.url, timeout=30) as c,
    ):
        assert c.get("/v2/models/translit/ready").status_code == 200
        assert c.get("/v2/models/translit/versions/1/ready").status_code == 200
        assert stub.ModelReady(v2.ModelReadyRequest(name="translit")).ready
        # A stream still open keeps the drain waiting, with the model READY meanwhile.
        request = GenerateRequest(model="translit", sequences=["abc"], kind="text")
        stream = live.engine.generate_stream(request)
        live.call(anext(stream))
        draining = asyncio.run_coroutine_threadsafe(live.engine.drain(10.0), live.loop)
        deadline = time.monotonic() + 10
        while not live.engine.draining and time.monotonic() < deadline:
            time.sleep(0.01)
        assert live.engine.draining and not draining.done()
        assert c.get("/v2/models/translit/ready").status_code == 503
        assert c.get("/v2/models/translit/versions/1/ready").status_code == 503
        assert not stub.ModelReady(v2.ModelReadyRequest(name="translit")).ready
        assert not stub.ModelReady(v2.ModelReadyRequest(name="translit", version="1")).ready
        live.call(stream.aclose())  # type: ignore[attr-defined]
        draining.result(30)
