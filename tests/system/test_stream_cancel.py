"""Streams that clients leave are counted once, as `cancelled`, on both wires: gRPC
`GenerateStream` calls cancelled after their first token, and server-sent-event streams whose
client disconnects after the first token."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
import httpx
import pytest

from rnnserve_client.proto.rnnserve.v1 import rnnserve_pb2 as pb
from rnnserve_client.proto.rnnserve.v1 import rnnserve_pb2_grpc as pb_grpc
from service.grpc_api.server import create_grpc_server
from tests.factories import write_model
from tests.support import LiveServer, live_server

pytestmark = pytest.mark.timeout(120)

CALLS = 20


@dataclass
class Servers:
    live: LiveServer
    grpc_port: int

    def outcomes(self, protocol: str) -> dict[str, float]:
        """`rnnserve_requests_total` of generate_stream by outcome."""
        registry = self.live.engine.metrics.registry
        found: dict[str, float] = {}
        for metric in registry.collect():
            for s in metric.samples:
                labels = s.labels
                if (
                    s.name == "rnnserve_requests_total"
                    and labels.get("endpoint") == "generate_stream"
                    and labels.get("protocol") == protocol
                ):
                    found[labels["outcome"]] = found.get(labels["outcome"], 0) + s.value
        return found


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    repository = tmp_path_factory.mktemp("repository")
    # Random weights rarely emit <eos>: each stream runs far longer than its first token.
    write_model(repository, "s2s", task="seq2seq", input_type="text", max_length=2000)
    with live_server(repository, grpc_port=0) as live:
        server = create_grpc_server(live.engine, live.settings, live.engine.metrics)
        port = live.call(server.start())
        try:
            yield Servers(live, port)
        finally:
            live.call(server.stop(0))


def _settled(servers: Servers, protocol: str, total: int) -> dict[str, float]:
    """The outcomes once `total` calls are counted (or after a few seconds)."""
    deadline = time.monotonic() + 10
    while True:
        found = servers.outcomes(protocol)
        if sum(found.values()) >= total or time.monotonic() > deadline:
            time.sleep(0.2)  # a late second count would show here
            return servers.outcomes(protocol)
        time.sleep(0.02)


def test_grpc_generate_streams_cancelled_after_the_first_token(servers: Servers) -> None:
    def leave_after_first(_: int) -> None:
        with grpc.insecure_channel(f"127.0.0.1:{servers.grpc_port}") as channel:
            api = pb_grpc.RnnServeStub(channel)
            request = pb.GenerateRequest(model="s2s", texts=pb.TextInputs(texts=["abc"]))
            call = api.GenerateStream(request, timeout=30)
            assert next(call).HasField("token")
            call.cancel()

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(leave_after_first, range(CALLS)))
    assert _settled(servers, "grpc", CALLS) == {"cancelled": CALLS}


def test_sse_streams_left_after_the_first_token(servers: Servers) -> None:
    def leave_after_first(_: int) -> None:
        body = {"texts": ["abc"], "stream": True}
        with (
            httpx.Client(base_url=servers.live.url, timeout=30) as client,
            client.stream("POST", "/v1/models/s2s/generate", json=body) as answer,
        ):
            assert answer.status_code == 200
            for line in answer.iter_lines():
                if line.startswith("event: token"):
                    break

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(leave_after_first, range(CALLS)))
    assert _settled(servers, "rest", CALLS) == {"cancelled": CALLS}
