"""gRPC sessions against a real grpc.aio server: StreamSession (the stream is the session) and
StreamChunk (portable tokens), through generated stubs on a loopback port."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from service._proto.rnnserve.v1 import rnnserve_pb2 as pb
from service._proto.rnnserve.v1 import rnnserve_pb2_grpc as pb_grpc
from service.grpc_api import create_grpc_server
from service.settings import Settings
from service.types import EncodeRequest
from tests.factories import write_model
from tests.test_sessions import Served

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Served, pb_grpc.RnnServeStub]]:
    repository: Path = tmp_path_factory.mktemp("repository")
    write_model(repository, "tagger", cell="lstm", num_layers=2, pooling="max", head=["a", "b"])
    write_model(repository, "bidirectional", cell="gru", bidirectional=True)
    served = Served(repository)
    settings = Settings(repository=repository, host="127.0.0.1", grpc_port=0, device="cpu")
    server = create_grpc_server(served.engine, settings, served.metrics)
    port = served.run(server.start())
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield served, pb_grpc.RnnServeStub(channel)
    finally:
        channel.close()
        served.run(server.stop(0.5))
        served.close()


def _chunk(array: np.ndarray) -> pb.SessionChunk:
    return pb.SessionChunk(
        inputs=pb.FloatArray(shape=list(array.shape), values=array.ravel().tolist())
    )


def test_stream_session_equals_whole(api: tuple[Served, pb_grpc.RnnServeStub]) -> None:
    served, stub = api
    sequence = np.random.default_rng(3).standard_normal((26, 8)).astype(np.float32)
    requests = [pb.SessionRequest(open=pb.SessionOpen(model="tagger", return_state=True))]
    requests += [pb.SessionRequest(chunk=_chunk(sequence[s : s + 7])) for s in range(0, 26, 7)]
    replies = list(stub.StreamSession(iter(requests), timeout=30))
    assert replies[0].WhichOneof("event") == "opened"
    opened = replies[0].opened
    assert opened.model == "tagger" and opened.version == 1 and opened.pooling == "max"
    chunks = [r.chunk for r in replies[1:]]
    assert [c.steps for c in chunks] == [7, 14, 21, 26]
    assert all(c.state_token for c in chunks)
    whole = served.run(served.engine.encode(EncodeRequest("tagger", [sequence], "features")))
    np.testing.assert_allclose(chunks[-1].encoding.values, whole.encodings[0], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(chunks[-1].scores, whole.scores[0], rtol=1e-4, atol=1e-5)
    assert chunks[-1].label == whole.labels[0]
    # The session ended with its stream.
    assert served.sessions.active == 0


def test_stream_chunk_round_trips_tokens(api: tuple[Served, pb_grpc.RnnServeStub]) -> None:
    served, stub = api
    sequence = np.random.default_rng(4).standard_normal((12, 8)).astype(np.float32)
    token = b""
    reply = pb.SessionChunkResult()
    for start in range(0, 12, 5):
        reply = stub.StreamChunk(
            pb.StreamChunkRequest(
                model="tagger",
                pooling="mean",
                state_token=token,
                chunk=_chunk(sequence[start : start + 5]),
            ),
            timeout=30,
        )
        token = reply.state_token
    whole = served.run(
        served.engine.encode(EncodeRequest("tagger", [sequence], "features", pooling="mean"))
    )
    assert reply.steps == 12
    np.testing.assert_allclose(reply.encoding.values, whole.encodings[0], rtol=1e-4, atol=1e-5)


def test_refusals_have_grpc_codes(api: tuple[Served, pb_grpc.RnnServeStub]) -> None:
    _, stub = api
    calls = {
        "bidirectional": [pb.SessionRequest(open=pb.SessionOpen(model="bidirectional"))],
        "chunk first": [pb.SessionRequest(chunk=_chunk(np.zeros((1, 8), np.float32)))],
        "missing": [pb.SessionRequest(open=pb.SessionOpen(model="missing"))],
        "bad token": [
            pb.SessionRequest(open=pb.SessionOpen(model="tagger", state_token=b"\x01abc"))
        ],
        "bad width": [
            pb.SessionRequest(open=pb.SessionOpen(model="tagger")),
            pb.SessionRequest(chunk=_chunk(np.zeros((2, 3), np.float32))),
        ],
    }
    codes = {}
    for name, requests in calls.items():
        with pytest.raises(grpc.RpcError) as info:
            list(stub.StreamSession(iter(requests), timeout=30))
        codes[name] = (info.value.code(), info.value.details())
    assert codes["bidirectional"][0] == grpc.StatusCode.INVALID_ARGUMENT
    assert "bidirectional" in codes["bidirectional"][1]
    assert codes["chunk first"][0] == grpc.StatusCode.INVALID_ARGUMENT
    assert codes["missing"][0] == grpc.StatusCode.NOT_FOUND
    assert codes["bad token"][0] == grpc.StatusCode.INVALID_ARGUMENT
    assert codes["bad token"][1].startswith("state_token")
    assert codes["bad width"][0] == grpc.StatusCode.INVALID_ARGUMENT
