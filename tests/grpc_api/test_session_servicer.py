"""gRPC sessions against a real grpc.aio server: StreamSession (the stream is the session) and
StreamChunk (portable tokens), through generated stubs on a loopback port."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from rnnserve_client.proto.rnnserve.v1 import rnnserve_pb2 as pb
from rnnserve_client.proto.rnnserve.v1 import rnnserve_pb2_grpc as pb_grpc
from service.core.sessions import BIDIRECTIONAL_REASON
from service.core.settings import Settings
from service.core.types import EncodeRequest
from service.grpc_api.server import create_grpc_server
from tests.factories import write_model
from tests.support import Served

pytestmark = pytest.mark.timeout(60)


def _serve(repository: Path, **options: object) -> Iterator[tuple[Served, pb_grpc.RnnServeStub]]:
    """A Served engine (with `options` for its Settings) behind a real gRPC server."""
    served = Served(repository, **options)
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


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Served, pb_grpc.RnnServeStub]]:
    repository: Path = tmp_path_factory.mktemp("repository")
    write_model(repository, "tagger", cell="lstm", num_layers=2, pooling="max", head=["a", "b"])
    write_model(repository, "bidirectional", cell="gru", bidirectional=True)
    yield from _serve(repository)


@pytest.fixture(scope="module")
def limited(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Served, pb_grpc.RnnServeStub]]:
    """A server that holds one session at most and expires it after 1 s idle."""
    repository: Path = tmp_path_factory.mktemp("repository")
    write_model(repository, "tagger", cell="gru")
    yield from _serve(repository, max_sessions=1, session_idle_timeout_s=1.0)


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
    assert codes["bidirectional"] == (
        grpc.StatusCode.INVALID_ARGUMENT,
        f"model: {BIDIRECTIONAL_REASON}",
    )
    assert codes["chunk first"] == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "open: the first message of a session must be 'open' (model and options)",
    )
    assert codes["missing"] == (
        grpc.StatusCode.NOT_FOUND,
        "model 'missing' is not known (known: bidirectional, tagger)",
    )
    assert codes["bad token"] == (grpc.StatusCode.INVALID_ARGUMENT, "state_token: is truncated")
    assert codes["bad width"] == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "inputs: each step must have 8 features (the model's input size), got 3",
    )


def test_tampered_and_foreign_tokens_are_refused(
    api: tuple[Served, pb_grpc.RnnServeStub],
) -> None:
    served, stub = api
    chunk = _chunk(np.ones((3, 8), np.float32))
    token = stub.StreamChunk(pb.StreamChunkRequest(model="tagger", chunk=chunk), timeout=30)
    raw = bytearray(token.state_token)
    raw[len(raw) // 2] ^= 0x01
    other = served.manager(key=b"another-replica-key-0123456789")
    foreign = served.run(other.stream("tagger", np.ones((3, 8), np.float32), "features"))
    served.run(other.stop())
    assert foreign.state_token is not None
    refusals = {}
    for name, bad in (("tampered", bytes(raw)), ("foreign", foreign.state_token)):
        with pytest.raises(grpc.RpcError) as info:
            stub.StreamChunk(
                pb.StreamChunkRequest(model="tagger", chunk=chunk, state_token=bad), timeout=30
            )
        refusals[name] = (info.value.code(), info.value.details())
    assert refusals["tampered"] == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "state_token: failed its integrity check (tampered)",
    )
    assert refusals["foreign"][0] == grpc.StatusCode.INVALID_ARGUMENT
    assert refusals["foreign"][1].startswith("state_token: was signed with a different server key")


def test_session_limit_and_idle_expiry(limited: tuple[Served, pb_grpc.RnnServeStub]) -> None:
    served, stub = limited
    release = threading.Event()

    def held() -> Iterator[pb.SessionRequest]:
        yield pb.SessionRequest(open=pb.SessionOpen(model="tagger"))
        release.wait(30)

    first = stub.StreamSession(held(), timeout=30)
    assert next(first).WhichOneof("event") == "opened"
    # The one session slot is taken: a second session is refused, with a retry hint.
    with pytest.raises(grpc.RpcError) as info:
        list(stub.StreamSession(iter([pb.SessionRequest(open=pb.SessionOpen(model="tagger"))])))
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert info.value.details().startswith("session limit reached: 1 sessions are open")
    assert "max_sessions" in info.value.details()
    assert float(dict(info.value.trailing_metadata())["retry-after"]) >= 1
    release.set()
    list(first)

    def idle_then_chunk() -> Iterator[pb.SessionRequest]:
        yield pb.SessionRequest(open=pb.SessionOpen(model="tagger"))
        time.sleep(2.0)  # well past the 1 s idle timeout
        yield pb.SessionRequest(chunk=_chunk(np.zeros((2, 8), np.float32)))

    replies = stub.StreamSession(idle_then_chunk(), timeout=30)
    opened = next(replies).opened
    with pytest.raises(grpc.RpcError) as info:
        next(replies)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert info.value.details() == (
        f"session '{opened.session_id}' expired after 1 s idle; open a new session "
        "(or resume it from its last state_token)"
    )
    assert served.sessions.active == 0


def test_a_chunk_timeout_over_the_limit_is_refused_as_on_every_wire(
    api: tuple[Served, pb_grpc.RnnServeStub],
) -> None:
    _, stub = api
    chunk = _chunk(np.ones((3, 8), np.float32))
    chunk.timeout_ms = 3_600_001
    with pytest.raises(grpc.RpcError) as info:
        stub.StreamChunk(pb.StreamChunkRequest(model="tagger", chunk=chunk), timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details() == (
        "timeout_ms: must be greater than 0 and at most 3600000 ms, got 3600001"
    )
    chunk.timeout_ms = 3_600_000  # the limit itself is accepted
    assert stub.StreamChunk(pb.StreamChunkRequest(model="tagger", chunk=chunk), timeout=30).steps
