"""Pooling "none" (every step's output) on every wire, alone and batched, equal lengths or not.

A batch whose rows all have the same length takes the recurrent layer's unpacked path, which
hands back a transposed (non-C-contiguous) view; answers must not depend on that. One real
server (REST and gRPC on one engine) serves an LSTM; each example sends a batch of sequences
over a wire and compares every step with the sequence encoded alone from the checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import numpy as np
import orjson
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from models import checkpoint
from rnnserve_client.proto.inference import grpc_service_pb2 as v2
from rnnserve_client.proto.inference import grpc_service_pb2_grpc as v2_grpc
from rnnserve_client.proto.rnnserve.v1 import rnnserve_pb2 as pb
from rnnserve_client.proto.rnnserve.v1 import rnnserve_pb2_grpc as pb_grpc
from service.grpc_api.server import create_grpc_server
from service.http_api import json_codecs as codecs
from tests.factories import write_model
from tests.support import LiveServer, decode_v2_outputs, live_server

pytestmark = pytest.mark.timeout(300)

FEATURES = 3
MODEL = "steps"


@dataclass
class Wires:
    live: LiveServer
    http: httpx.Client
    channel: grpc.Channel
    path: Path

    @property
    def api(self) -> pb_grpc.RnnServeStub:
        return pb_grpc.RnnServeStub(self.channel)

    @property
    def v2(self) -> v2_grpc.GRPCInferenceServiceStub:
        return v2_grpc.GRPCInferenceServiceStub(self.channel)


@pytest.fixture(scope="module")
def wires(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Wires]:
    repository = tmp_path_factory.mktemp("repository")
    path = write_model(repository, MODEL, input_size=FEATURES, hidden_size=8, seed=4)
    with live_server(repository, grpc_port=0) as live:
        # NOTE: the gRPC server on the same engine and loop (held here: a dropped grpc.aio
        # server stops).
        server = create_grpc_server(live.engine, live.settings, live.engine.metrics)
        port = live.call(server.start())
        try:
            with (
                httpx.Client(base_url=live.url, timeout=30) as http,
                grpc.insecure_channel(f"127.0.0.1:{port}") as channel,
            ):
                yield Wires(live, http, channel, path)
        finally:
            live.call(server.stop(0))


def alone(path: Path, sequence: np.ndarray) -> np.ndarray:
    """Every step's output of `sequence` encoded alone, straight from the checkpoint."""
    loaded = checkpoint.load(path)
    with torch.inference_mode():
        out = loaded.model(torch.from_numpy(sequence)[None], torch.tensor([len(sequence)]), "none")
    return out.encodings[0].numpy()


def padded(batch: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    lengths = np.array([len(s) for s in batch], dtype=np.int64)
    out = np.zeros((len(batch), int(lengths.max()), FEATURES), np.float32)
    for i, s in enumerate(batch):
        out[i, : len(s)] = s
    return out, lengths


# -- one function per wire: a batch in, each sequence's [T_i, E] steps out --------------------


def rest_json(w: Wires, batch: list[np.ndarray]) -> list[np.ndarray]:
    body = {"inputs": [s.tolist() for s in batch], "pooling": "none"}
    r = w.http.post(f"/v1/models/{MODEL}/encode", json=body)
    assert r.status_code == 200, r.text
    return [np.array(e, np.float32) for e in r.json()["encodings"]]


def v2_rest(binary: bool) -> Callable[[Wires, list[np.ndarray]], list[np.ndarray]]:
    def call(w: Wires, batch: list[np.ndarray]) -> list[np.ndarray]:
        inputs, lengths = padded(batch)
        header = {
            "inputs": [
                {"name": "INPUT", "datatype": "FP32", "shape": list(inputs.shape)},
                {"name": "LENGTHS", "datatype": "INT64", "shape": [len(batch)]},
            ],
            "parameters": {"pooling": "none", "binary_data_output": binary},
        }
        header["inputs"][0]["data"] = inputs.ravel().tolist()  # type: ignore[index]
        header["inputs"][1]["data"] = lengths.tolist()  # type: ignore[index]
        r = w.http.post(f"/v2/models/{MODEL}/infer", content=orjson.dumps(header))
        assert r.status_code == 200, r.text
        if binary:
            n = int(r.headers[codecs.HEADER_LENGTH])
            head, tail = codecs.split_v2_body(r.content, str(n))
            tensors = codecs.decode_v2_inputs({"inputs": head["outputs"]}, tail)
            encoding = next(t.data for t in tensors if t.name == "ENCODING")
        else:
            out = next(o for o in r.json()["outputs"] if o["name"] == "ENCODING")
            encoding = np.array(out["data"], np.float32).reshape(out["shape"])
        assert isinstance(encoding, np.ndarray)
        return [encoding[i, : len(s)] for i, s in enumerate(batch)]

    return call


def grpc_encode(w: Wires, batch: list[np.ndarray]) -> list[np.ndarray]:
    request = pb.EncodeRequest(model=MODEL, pooling="none")
    for s in batch:
        request.inputs.sequences.add(shape=list(s.shape), values=s.ravel().tolist())
    answer = w.api.Encode(request, timeout=30)
    return [np.array(e.values, np.float32).reshape(list(e.shape)) for e in answer.encodings]


def v2_grpc_infer(w: Wires, batch: list[np.ndarray]) -> list[np.ndarray]:
    inputs, lengths = padded(batch)
    request = v2.ModelInferRequest(model_name=MODEL)
    request.parameters["pooling"].string_param = "none"
    tensor = request.inputs.add(name="INPUT", datatype="FP32", shape=list(inputs.shape))
    tensor.contents.fp32_contents.extend(inputs.ravel().tolist())
    length = request.inputs.add(name="LENGTHS", datatype="INT64", shape=[len(batch)])
    length.contents.int64_contents.extend(lengths.tolist())
    outputs = decode_v2_outputs(w.v2.ModelInfer(request, timeout=30))
    encoding = outputs["ENCODING"].data
    assert isinstance(encoding, np.ndarray)
    return [encoding[i, : len(s)] for i, s in enumerate(batch)]


def concurrently(
    one: Callable[[Wires, np.ndarray], np.ndarray],
) -> Callable[[Wires, list[np.ndarray]], list[np.ndarray]]:
    """One request per sequence, all at once (so that they share batches)."""

    def call(w: Wires, batch: list[np.ndarray]) -> list[np.ndarray]:
        with ThreadPoolExecutor(len(batch)) as pool:
            return list(pool.map(lambda s: one(w, s), batch))

    return call


def rest_session(w: Wires, sequence: np.ndarray) -> np.ndarray:
    opened = w.http.post(f"/v1/models/{MODEL}/sessions", json={"pooling": "none"})
    assert opened.status_code in (200, 201), opened.text
    sid = opened.json()["session_id"]
    r = w.http.post(f"/v1/sessions/{sid}/chunks", json={"inputs": sequence.tolist()})
    assert r.status_code == 200, r.text
    w.http.delete(f"/v1/sessions/{sid}")
    return np.array(r.json()["encoding"], np.float32)


def rest_stream(w: Wires, sequence: np.ndarray) -> np.ndarray:
    body = {"inputs": sequence.tolist(), "pooling": "none"}
    r = w.http.post(f"/v1/models/{MODEL}/stream", json=body)
    assert r.status_code == 200, r.text
    return np.array(r.json()["encoding"], np.float32)


def _chunk(sequence: np.ndarray) -> pb.SessionChunk:
    return pb.SessionChunk(
        inputs=pb.FloatArray(shape=list(sequence.shape), values=sequence.ravel().tolist())
    )


def grpc_session(w: Wires, sequence: np.ndarray) -> np.ndarray:
    requests = [
        pb.SessionRequest(open=pb.SessionOpen(model=MODEL, pooling="none")),
        pb.SessionRequest(chunk=_chunk(sequence)),
    ]
    _, reply = list(w.api.StreamSession(iter(requests), timeout=30))
    return np.array(reply.chunk.encoding.values, np.float32).reshape(
        list(reply.chunk.encoding.shape)
    )


def grpc_stream(w: Wires, sequence: np.ndarray) -> np.ndarray:
    request = pb.StreamChunkRequest(model=MODEL, pooling="none", chunk=_chunk(sequence))
    reply = w.api.StreamChunk(request, timeout=30)
    return np.array(reply.encoding.values, np.float32).reshape(list(reply.encoding.shape))


WIRES: dict[str, Callable[[Wires, list[np.ndarray]], list[np.ndarray]]] = {
    "rest": rest_json,
    "v2-rest-json": v2_rest(binary=False),
    "v2-rest-binary": v2_rest(binary=True),
    "grpc": grpc_encode,
    "v2-grpc": v2_grpc_infer,
    "rest-session": concurrently(rest_session),
    "rest-stream": concurrently(rest_stream),
    "grpc-session": concurrently(grpc_session),
    "grpc-stream": concurrently(grpc_stream),
}


@st.composite
def batches(draw: st.DrawFn) -> list[np.ndarray]:
    """1–4 sequences of 1–6 steps; half the time all of one length (the unpacked path)."""
    size = draw(st.integers(1, 4))
    if draw(st.booleans()):
        lengths = [draw(st.integers(1, 6))] * size
    else:
        lengths = draw(st.lists(st.integers(1, 6), min_size=size, max_size=size))
    seed = draw(st.integers(0, 2**16))
    gen = np.random.default_rng(seed)
    return [gen.normal(size=(n, FEATURES)).astype(np.float32) for n in lengths]


@pytest.mark.parametrize("wire", list(WIRES))
@settings(
    max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(batch=batches())
def test_pooling_none_equals_each_sequence_alone(
    wires: Wires, wire: str, batch: list[np.ndarray]
) -> None:
    answers = WIRES[wire](wires, batch)
    assert len(answers) == len(batch)
    for sequence, answer in zip(batch, answers, strict=True):
        np.testing.assert_allclose(answer, alone(wires.path, sequence), rtol=1e-5, atol=1e-5)


def test_equal_length_texts_with_pooling_none_over_rest(tmp_path: Path) -> None:
    """The simplest report: two texts of the same length, pooling "none", over REST JSON."""
    path = write_model(tmp_path, "names", input_type="text", cell="gru", bidirectional=True)
    with live_server(tmp_path) as live, httpx.Client(base_url=live.url, timeout=30) as http:
        for texts in (["schmidt", "schmidx"], ["virtanen", "virtanen"]):
            r = http.post("/v1/models/names/encode", json={"texts": texts, "pooling": "none"})
            assert r.status_code == 200, r.text
            loaded = checkpoint.load(path)
            assert loaded.input_tokenizer is not None
            for text, got in zip(texts, r.json()["encodings"], strict=True):
                ids = torch.tensor([loaded.input_tokenizer.encode(text)])
                with torch.inference_mode():
                    want = loaded.model(ids, torch.tensor([len(text)]), "none").encodings[0]
                np.testing.assert_allclose(np.array(got), want.numpy(), rtol=1e-5, atol=1e-5)
            # The connection stays usable (a 500 used to make uvicorn drop it).
            assert http.get("/healthz").status_code == 200
