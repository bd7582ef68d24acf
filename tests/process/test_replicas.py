"""gRPC over several replicas behind a connection balancer, as on Kubernetes.

Real `rnnserve serve` replicas on loopback (one repository, one RNNSERVE_STATE_KEY) sit behind a
TCP balancer written here that does what kube-proxy does for a ClusterIP Service: each new TCP
connection goes to the next backend, and a connection stays with its backend for its whole
life. A gRPC client keeps one connection, so without connection ageing all its calls land on one
replica; the replicas here age connections after AGE_S (`--grpc-max-connection-age-s`), and the
tests check what that buys: every replica gets a fair share of one long-lived client, a replica
added mid-run gets traffic within about the age, a state-token stream hops replicas without
loss, and a replica drained with SIGTERM loses nothing its clients sent. Per-replica counts come
from each replica's own /metrics (`rnnserve_requests_total`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
from pydantic import ValidationError

from rnnserve_client import Client, ConnectionFailed, RnnserveError
from rnnserve_client.proto.inference import grpc_service_pb2 as v2
from rnnserve_client.proto.inference import grpc_service_pb2_grpc as v2_grpc
from service.core.settings import Settings
from service.grpc_api.server import connection_age_options
from tests.factories import write_model
from tests.support import ServerProcess, requests_total, running_server

pytestmark = pytest.mark.timeout(180)

AGE_S = 1.0
FEATURES = 4
HEAVY_STEPS = 12_000  # a second or more of single-thread compute for the 512-unit LSTM "heavy"
STATE_KEY = "replicas-share-this-state-key-0123456789"


# --- the balancer -------------------------------------------------------------------------------


class RoundRobinBalancer:
    """A TCP balancer on 127.0.0.1: each new connection goes to the next backend port in turn
    (kube-proxy's per-connection balancing); bytes are copied both ways until either side
    closes. Runs its own event loop on a thread."""

    def __init__(self, backends: list[int]) -> None:
        self.backends = list(backends)
        self.connections: dict[int, int] = dict.fromkeys(backends, 0)
        self._turn = 0
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None
        self.port = 0

    def start(self) -> RoundRobinBalancer:
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._accept, "127.0.0.1", 0), self._loop
        ).result(10)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def set_backends(self, backends: list[int]) -> None:
        """New connections go to these from now on; open ones stay where they are."""
        with self._lock:
            self.backends = list(backends)
            for port in backends:
                self.connections.setdefault(port, 0)

    def _next(self) -> int:
        with self._lock:
            port = self.backends[self._turn % len(self.backends)]
            self._turn += 1
            self.connections[port] += 1
            return port

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self._next())
        except OSError:
            writer.close()
            return
        await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))

    def stop(self) -> None:
        """Close the listener and every connection, then the loop."""

        async def close() -> None:
            assert self._server is not None
            self._server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


async def _pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
    try:
        while data := await source.read(65536):
            sink.write(data)
            await sink.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        sink.close()


# --- replicas and load --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("repo")
    write_model(root, "feat", input_size=FEATURES, head=["a", "b"], pooling="mean")
    write_model(
        root,
        "heavy",
        input_size=FEATURES,
        hidden_size=512,
        serving={"max_sequence_length": 50_000},
    )
    return root


@pytest.fixture(scope="module", autouse=True)
def shared_state_key() -> Iterator[None]:
    """Every replica this module starts shares the state-token key (as on Kubernetes)."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("RNNSERVE_STATE_KEY", STATE_KEY)
        yield


def replica(repository: Path) -> contextlib.AbstractContextManager[ServerProcess]:
    """One replica, ageing its gRPC connections."""
    return running_server(repository, "--grpc-max-connection-age-s", str(AGE_S))


@pytest.fixture(scope="module")
def pair(repository: Path) -> Iterator[list[ServerProcess]]:
    """Two replicas, started side by side."""
    with contextlib.ExitStack() as stack, ThreadPoolExecutor(2) as pool:
        started = [pool.submit(stack.enter_context, replica(repository)) for _ in range(2)]
        yield [future.result(90) for future in started]


@pytest.fixture
def balancer(pair: list[ServerProcess]) -> Iterator[RoundRobinBalancer]:
    proxy = RoundRobinBalancer([s.grpc_port for s in pair]).start()
    try:
        yield proxy
    finally:
        proxy.stop()


def _features(seed: int, steps: int = 6) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(steps, FEATURES)).astype(np.float32)


def served_by(server: ServerProcess, protocol: str, endpoint: str) -> float:
    """Successful calls of `protocol`/`endpoint` a replica answered so far."""
    return requests_total(server.url, protocol=protocol, endpoint=endpoint, outcome="success")


# NOTE: tritonclient runs in a process of its own: its inference.* protos and rnnserve's share
# symbol names, which one protobuf descriptor pool cannot hold together.
_TRITON_LOAD = textwrap.dedent(
    """
    import json, sys, time
    import numpy as np
    import tritonclient.grpc as tc

    address, seconds = sys.argv[1], float(sys.argv[2])
    client = tc.InferenceServerClient(address)
    batch = np.random.default_rng(0).normal(size=(1, 6, 4)).astype(np.float32)
    x = tc.InferInput("INPUT", list(batch.shape), "FP32")
    x.set_data_from_numpy(batch)
    ok, failed = 0, []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            client.infer("feat", [x])
            ok += 1
        except tc.InferenceServerException as exc:
            failed.append(f"{exc.status()}: {exc.message()}")
    print(json.dumps({"ok": ok, "failed": failed}))
    """
)


def triton_load(port: int, seconds: float) -> subprocess.Popen[str]:
    """A long-lived tritonclient.grpc client sending V2 ModelInfer through port for seconds."""
    return subprocess.Popen(
        [sys.executable, "-c", _TRITON_LOAD, f"127.0.0.1:{port}", str(seconds)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def triton_result(process: subprocess.Popen[str]) -> dict[str, Any]:
    out, err = process.communicate(timeout=120)
    assert process.returncode == 0, err
    result: dict[str, Any] = json.loads(out)
    return result


@dataclass
class Load:
    """An rnnserve_client (gRPC) calling encode in a loop on a thread: one channel, one
    long-lived connection at a time, as a service's client keeps."""

    port: int
    answers: int = 0
    failures: list[str] = field(default_factory=list)
    wrong: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> Load:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        sequence = _features(1)
        with Client(f"grpc://127.0.0.1:{self.port}", timeout=30) as client:
            expected = client.encode("feat", inputs=[sequence]).encodings
            while not self._stop.is_set():
                try:
                    result = client.encode("feat", inputs=[sequence])
                except RnnserveError as exc:
                    self.failures.append(f"{type(exc).__name__}: {exc}")
                    continue
                self.answers += 1
                if not np.allclose(result.encodings, expected, rtol=1e-5, atol=1e-6):
                    self.wrong += 1

    def stop(self) -> Load:
        self._stop.set()
        assert self._thread is not None
        self._thread.join(60)
        return self


# --- tests --------------------------------------------------------------------------------------


def test_ageing_gives_each_replica_a_fair_share_of_one_client(
    pair: list[ServerProcess], balancer: RoundRobinBalancer
) -> None:
    before = [served_by(s, "v2-grpc", "infer") for s in pair]
    result = triton_result(triton_load(balancer.port, 6 * AGE_S))
    counts = [served_by(s, "v2-grpc", "infer") - b for s, b in zip(pair, before, strict=True)]
    assert result["failed"] == [] and sum(counts) == result["ok"] > 0
    assert min(counts) >= 0.25 * sum(counts), counts
    # The client kept one connection at a time and opened a new one per age.
    assert sum(balancer.connections.values()) >= 4, balancer.connections


def test_a_replica_added_mid_run_gets_traffic_within_the_age(
    repository: Path, pair: list[ServerProcess], balancer: RoundRobinBalancer
) -> None:
    loads = [Load(balancer.port).start() for _ in range(2)]
    triton = triton_load(balancer.port, 30)
    try:
        with replica(repository) as added:
            balancer.set_backends([*balancer.backends, added.grpc_port])
            added_at = time.monotonic()
            served = 0.0
            while served == 0 and time.monotonic() < added_at + 20 * AGE_S:
                served = served_by(added, "grpc", "encode") + served_by(added, "v2-grpc", "infer")
                time.sleep(0.05)
            waited = time.monotonic() - added_at
            balancer.set_backends(balancer.backends[:-1])
    finally:
        triton.kill()
        for load in loads:
            load.stop()
    assert served > 0, "the new replica got no traffic"
    # Three long-lived connections each reconnect within the age (±10%), and three new
    # connections in turn reach every backend: the new one is served within about the age.
    assert waited < 2.5 * AGE_S, f"first call on the new replica after {waited:.2f} s"
    assert all(not load.failures and load.wrong == 0 for load in loads)


def test_a_state_token_stream_hops_replicas_without_loss(
    pair: list[ServerProcess], balancer: RoundRobinBalancer
) -> None:
    whole = _features(2, 12)
    before = [served_by(s, "grpc", "stream") for s in pair]
    with Client(f"grpc://127.0.0.1:{balancer.port}") as client:
        expected = client.encode("feat", inputs=[whole])
        token = None
        for chunk in np.split(whole, 6):
            result = client.stream("feat", chunk, token)
            token = result.state_token
            time.sleep(0.6 * AGE_S)
    hops = [served_by(s, "grpc", "stream") - b for s, b in zip(pair, before, strict=True)]
    assert sum(hops) == 6 and min(hops) > 0, hops
    assert result.steps == 12
    np.testing.assert_allclose(result.encoding, expected.encodings[0], rtol=1e-4, atol=1e-5)


def test_a_replica_drained_with_sigterm_loses_no_request(
    repository: Path, pair: list[ServerProcess], balancer: RoundRobinBalancer
) -> None:
    with replica(repository) as leaving, ThreadPoolExecutor(1) as pool:
        balancer.set_backends([*balancer.backends, leaving.grpc_port])
        loads = [Load(balancer.port).start() for _ in range(3)]
        triton = triton_load(balancer.port, 6)
        try:
            deadline = time.monotonic() + 30
            while served_by(leaving, "grpc", "encode") < 20:
                assert time.monotonic() < deadline, "the leaving replica got no traffic"
                time.sleep(0.05)
            # A long call admitted before the signal keeps the drain going for a while.
            heavy = pool.submit(
                httpx.post,
                f"{leaving.url}/v1/models/heavy/encode",
                json={"inputs": [np.zeros((HEAVY_STEPS, FEATURES)).tolist()]},
                timeout=60,
            )
            while leaving.metric("rnnserve_inflight_requests", model="heavy") < 1:
                assert time.monotonic() < deadline, "the long call never started"
                time.sleep(0.01)
            # As on Kubernetes: the endpoint goes first (preStop), then SIGTERM.
            balancer.set_backends(balancer.backends[:-1])
            leaving.process.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            # (seconds since the signal, calls refused as draining so far)
            refusals: list[tuple[float, float]] = []
            while not heavy.done():
                with contextlib.suppress(httpx.HTTPError):
                    refused = requests_total(leaving.url, protocol="grpc", outcome="draining")
                    refusals.append((time.monotonic() - signalled, refused))
                time.sleep(0.05)
            answer = heavy.result()
            code = leaving.process.wait(30)
            time.sleep(2 * AGE_S)
        finally:
            for load in loads:
                load.stop()
    failed_triton_calls = triton_result(triton)["failed"]
    assert code == 0 and leaving.events("server.stopped")
    # The call the replica had accepted was answered.
    assert answer.status_code == 200, answer.text
    # At SIGTERM every client connection was told to go away (GOAWAY): the clients went to
    # the other replicas at once instead of being refused by the draining one (without the
    # GOAWAY, every call on its connections was, until it exited: 12 here and rising through
    # the drain). Only calls sent before a client read the GOAWAY may still be refused
    # (UNAVAILABLE, Draining; rnnserve_client retries them): a few at the signal, none after.
    assert refusals, "the draining replica's metrics were never read"
    refused_in_the_end = refusals[-1][1]
    settled = [refused for since, refused in refusals if since >= 0.5]
    assert not settled or settled[0] == refused_in_the_end, refusals
    assert refused_in_the_end <= 2 * len(loads), refusals
    assert all(load.answers > 0 for load in loads)
    # Every call was answered, and rightly: none failed, none was lost or answered wrong.
    assert [load.failures for load in loads] == [[], [], []]
    assert sum(load.wrong for load in loads) == 0
    # tritonclient does not retry: at most a call sent at the very moment of the GOAWAY is
    # cancelled unprocessed (rnnserve_client retries those), never a refusal.
    assert all(f.startswith("StatusCode.CANCELLED") for f in failed_triton_calls), (
        failed_triton_calls
    )


def test_a_list_of_addresses_spreads_calls_round_robin(pair: list[ServerProcess]) -> None:
    labels = {"model": "feat", "endpoint": "encode", "outcome": "success"}
    urls = [f"grpc://127.0.0.1:{s.grpc_port}" for s in pair] + [s.url for s in pair]
    before = [requests_total(s.url, **labels, protocol=p) for p in ("grpc", "rest") for s in pair]
    with Client(urls) as client, ThreadPoolExecutor(8) as pool:
        calls = [pool.submit(client.encode, "feat", inputs=[_features(i)]) for i in range(8)]
        assert all(call.result(60).encodings.shape[0] == 1 for call in calls)
    after = [requests_total(s.url, **labels, protocol=p) for p in ("grpc", "rest") for s in pair]
    assert [a - b for a, b in zip(after, before, strict=True)] == [2, 2, 2, 2]


def _v2_stream_request(seed: int) -> v2.ModelInferRequest:
    x = _features(seed, 3)[None]
    request = v2.ModelInferRequest(model_name="feat", id=str(seed))
    request.inputs.add(name="INPUT", datatype="FP32", shape=x.shape)
    request.raw_input_contents.append(x.astype("<f4").tobytes())
    return request


def test_streams_outlive_the_connection_age(pair: list[ServerProcess]) -> None:
    # The default grace is unlimited: a stream open when its connection ages goes on (any call
    # in flight does: StreamSession, ModelStreamInfer, GenerateStream alike); only new calls
    # move to a new connection.
    server = pair[0]
    with (
        Client(f"grpc://127.0.0.1:{server.grpc_port}") as client,
        client.session("feat") as session,
    ):
        for i in range(6):
            assert session.send(_features(i, 1)).steps == i + 1
            time.sleep(0.45 * AGE_S)

    def slow_requests() -> Iterator[v2.ModelInferRequest]:
        for seed in range(6):
            yield _v2_stream_request(seed)
            time.sleep(0.45 * AGE_S)

    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        stub = v2_grpc.GRPCInferenceServiceStub(channel)
        started = time.monotonic()
        answers = list(stub.ModelStreamInfer(slow_requests(), timeout=60))
    assert time.monotonic() - started > 2.2 * AGE_S
    assert [a.error_message for a in answers] == [""] * 6
    assert [a.infer_response.id for a in answers] == [str(seed) for seed in range(6)]


def test_a_finite_grace_cuts_a_stream_at_age_plus_grace(repository: Path) -> None:
    flags = ("--grpc-max-connection-age-s", str(AGE_S), "--grpc-max-connection-age-grace-s", "1")
    with (
        running_server(repository, *flags) as server,
        Client(f"grpc://127.0.0.1:{server.grpc_port}") as client,
    ):
        session = client.session("feat")
        opened = time.monotonic()
        with pytest.raises(ConnectionFailed, match="max connection age"):
            for i in range(40):
                session.send(_features(i, 1))
                time.sleep(0.1)
        cut_after = time.monotonic() - opened
        session.close()
        # New calls go on, on a new connection.
        assert client.encode("feat", inputs=[_features(1)]).encodings.shape[0] == 1
    # Cut at the connection's age (±10%) plus the grace, after the session opened on it.
    assert cut_after < 1.1 * AGE_S + 1 + 1.0


def test_connection_age_settings_become_grpc_core_options(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    defaults = Settings()
    assert defaults.grpc_max_connection_age_s == 60.0
    assert math.isinf(defaults.grpc_max_connection_age_grace_s)
    assert connection_age_options(defaults) == [
        ("grpc.max_connection_age_ms", 60_000),
        # INT_MAX: grpc core's "never" (streams are not cut by ageing).
        ("grpc.max_connection_age_grace_ms", 2**31 - 1),
    ]
    monkeypatch.setenv("RNNSERVE_GRPC_MAX_CONNECTION_AGE_S", "inf")
    monkeypatch.setenv("RNNSERVE_GRPC_MAX_CONNECTION_AGE_GRACE_S", "2.5")
    assert connection_age_options(Settings()) == [
        ("grpc.max_connection_age_ms", 2**31 - 1),
        ("grpc.max_connection_age_grace_ms", 2500),
    ]
    for bad in (0, -1):
        with pytest.raises(ValidationError, match="grpc_max_connection_age_s"):
            Settings(grpc_max_connection_age_s=bad)
