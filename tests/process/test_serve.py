"""`rnnserve serve` as a real subprocess: one process, one engine for HTTP and gRPC, SIGTERM drain.

The server binds port 0 for both protocols and the test reads the bound ports from the JSON
startup summary (`server.ready`), so parallel runs never collide.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rnnserve_client.proto.rnnserve.v1 import rnnserve_pb2 as pb
from rnnserve_client.proto.rnnserve.v1 import rnnserve_pb2_grpc as pb_grpc
from tests.factories import write_model
from tests.support import GRACE_S, ServerProcess, running_server

pytestmark = pytest.mark.timeout(120)

FEATURES = 4
HEAVY_STEPS = 12_000  # ~1.5 s of single-thread compute for the 512-unit LSTM below
# Once draining, gRPC health says NOT_SERVING, or cannot be asked at all: the server sent every
# connection GOAWAY and stopped listening (clients move to other replicas).
NOT_READY_GRPC = ("NOT_SERVING", "gone")


def _repository(root: Path) -> Path:
    # "pair" closes a batch at 2 sequences (or after 5 s while the device is busy).
    write_model(
        root,
        "pair",
        input_type="features",
        input_size=FEATURES,
        serving={"max_batch_size": 2, "max_delay_ms": 5000.0},
    )
    write_model(root, "enc", input_type="features", input_size=FEATURES, seed=1)
    write_model(
        root,
        "heavy",
        input_type="features",
        input_size=FEATURES,
        hidden_size=512,
        serving={"max_sequence_length": 50_000},
    )
    return root


@pytest.fixture(scope="module")
def shared_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with running_server(_repository(tmp_path_factory.mktemp("repo"))) as served:
        yield served


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    with running_server(_repository(tmp_path / "repo")) as served:
        yield served


def _features(seed: int, steps: int = 6) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(steps, FEATURES)).astype(np.float32)


def _grpc_encode(stub: pb_grpc.RnnServeStub, model: str, seq: np.ndarray) -> pb.EncodeResponse:
    message = pb.EncodeRequest(model=model)
    message.inputs.sequences.add(shape=seq.shape, values=seq.ravel().tolist())
    response: pb.EncodeResponse = stub.Encode(message, timeout=60)
    return response


def test_startup_summary_and_health(shared_server: ServerProcess) -> None:
    server = shared_server
    (ready,) = server.events("server.ready")
    assert ready["device"] == "cpu"
    # The ready line tells a person where the API's docs are.
    assert ready["docs"] == f"{server.url}/docs"
    assert "swagger-ui" in httpx.get(ready["docs"], timeout=10).text
    assert {m["name"] for m in ready["models"]} == {"pair", "enc", "heavy"}
    assert all(m["state"] == "READY" and m["load_s"] > 0 for m in ready["models"])
    assert httpx.get(f"{server.url}/readyz", timeout=10).status_code == 200
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        answer = health.Check(health_pb2.HealthCheckRequest(service="enc"), timeout=10)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING


def _hold_device(
    server: ServerProcess, stub: pb_grpc.RnnServeStub, pool: ThreadPoolExecutor
) -> Any:
    """Start one long "heavy" request and return its future once the engine admitted it."""
    heavy = pool.submit(_grpc_encode, stub, "heavy", _features(0, HEAVY_STEPS))
    deadline = time.monotonic() + 30
    while server.metric("rnnserve_inflight_requests", model="heavy") < 1:
        assert time.monotonic() < deadline and not heavy.done()
        time.sleep(0.01)
    return heavy


def test_http_and_grpc_requests_share_one_batch(shared_server: ServerProcess) -> None:
    server = shared_server
    labels = {"model": "pair", "version": "1", "kind": "encode"}
    calls_before = server.metric("rnnserve_batch_size_count", **labels)
    rows_before = server.metric("rnnserve_batch_size_sum", **labels)
    seq_http, seq_grpc = _features(1), _features(2)
    with (
        grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel,
        ThreadPoolExecutor(3) as pool,
    ):
        stub = pb_grpc.RnnServeStub(channel)
        # The device runs one long sequence; meanwhile "pair" queues both requests.
        heavy = _hold_device(server, stub, pool)
        over_http = pool.submit(
            httpx.post,
            f"{server.url}/v1/models/pair/encode",
            json={"inputs": [seq_http.tolist()]},
            timeout=60,
        )
        over_grpc = pool.submit(_grpc_encode, stub, "pair", seq_grpc)
        http_answer, grpc_answer = over_http.result(60), over_grpc.result(60)
        assert heavy.result(60).encodings
        http_alone = _grpc_encode(stub, "pair", seq_http)
        grpc_alone = _grpc_encode(stub, "pair", seq_grpc)
    assert http_answer.status_code == 200, http_answer.text
    # One model call on "pair" carried both sequences (then the two "alone" calls).
    assert server.metric("rnnserve_batch_size_count", **labels) == calls_before + 3
    assert server.metric("rnnserve_batch_size_sum", **labels) == rows_before + 4
    # Batched answers equal each sequence encoded alone.
    np.testing.assert_allclose(
        http_answer.json()["encodings"][0], http_alone.encodings[0].values, atol=1e-5
    )
    np.testing.assert_allclose(
        grpc_answer.encodings[0].values, grpc_alone.encodings[0].values, atol=1e-5
    )


@dataclass
class Outcome:
    protocol: str
    started: float
    ended: float
    result: str  # "ok", "refused" (draining / connection refused), or the failure


def _http_worker(url: str, stop: threading.Event, out: list[Outcome], seed: int) -> None:
    with httpx.Client(timeout=60) as client:
        i = 0
        while not stop.is_set():
            steps = 400 if i % 2 else 8
            body = {"inputs": [_features(seed + i, steps).tolist()]}
            started = time.monotonic()
            try:
                answer = client.post(f"{url}/v1/models/enc/encode", json=body)
                if answer.status_code == 200:
                    result = "ok"
                elif answer.status_code == 503:
                    result = "refused"
                else:
                    result = f"http {answer.status_code}: {answer.text[:200]}"
            except httpx.ConnectError:
                result = "refused"
            except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError) as exc:
                # The connection closed without an answer: only acceptable once shutting down.
                result = f"closed: {type(exc).__name__}"
            except httpx.HTTPError as exc:
                result = f"{type(exc).__name__}: {exc}"
            out.append(Outcome("http", started, time.monotonic(), result))
            if result == "refused":
                time.sleep(0.02)
            i += 1


def _grpc_worker(port: int, stop: threading.Event, out: list[Outcome], seed: int) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.RnnServeStub(channel)
        i = 0
        while not stop.is_set():
            steps = 400 if i % 2 else 8
            started = time.monotonic()
            try:
                _grpc_encode(stub, "enc", _features(seed + i, steps))
                result = "ok"
            except grpc.RpcError as exc:
                code = exc.code()  # type: ignore[attr-defined]
                details = exc.details()  # type: ignore[attr-defined]
                result = "refused" if code == grpc.StatusCode.UNAVAILABLE else f"{code}: {details}"
            out.append(Outcome("grpc", started, time.monotonic(), result))
            if result == "refused":
                time.sleep(0.02)
            i += 1


def _grpc_health(health: health_pb2_grpc.HealthStub) -> str:
    """The overall gRPC health, or "gone" once the draining server stopped listening."""
    try:
        status = health.Check(health_pb2.HealthCheckRequest(), timeout=5).status
    except grpc.RpcError as exc:
        if exc.code() == grpc.StatusCode.UNAVAILABLE:  # type: ignore[attr-defined]
            return "gone"
        raise
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(status))


def _readiness(server: ServerProcess, channel: grpc.Channel) -> tuple[int, str]:
    """(HTTP /readyz status, gRPC overall health) once both turned not-ready (or after 1 s)."""
    health = health_pb2_grpc.HealthStub(channel)
    deadline = time.monotonic() + 1.0
    while True:
        status = httpx.get(f"{server.url}/readyz", timeout=5).status_code
        serving = _grpc_health(health)
        if status == 503 and serving in NOT_READY_GRPC:
            return status, serving
        if time.monotonic() > deadline:
            return status, serving
        time.sleep(0.01)


def test_sigterm_under_load_drains_and_exits_zero(server: ServerProcess) -> None:
    outcomes: list[Outcome] = []
    stop = threading.Event()
    workers = [
        threading.Thread(target=_http_worker, args=(server.url, stop, outcomes, 100 * k))
        for k in range(2)
    ] + [
        threading.Thread(target=_grpc_worker, args=(server.grpc_port, stop, outcomes, 1000 * k))
        for k in range(2)
    ]
    for worker in workers:
        worker.start()
    try:
        with (
            grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel,
            ThreadPoolExecutor(1) as pool,
        ):
            time.sleep(1.0)
            # A long request admitted before the signal must still be answered.
            heavy = _hold_device(server, pb_grpc.RnnServeStub(channel), pool)
            signalled = time.monotonic()
            server.process.send_signal(signal.SIGTERM)
            # Readiness is off at once on both protocols while admitted work still runs.
            ready_http, ready_grpc = _readiness(server, channel)
            assert not heavy.done(), "the heavy request ended before readiness was checked"
            heavy_answer = heavy.result(GRACE_S + 10)
            code = server.process.wait(GRACE_S + 10)
            exited = time.monotonic()
        time.sleep(0.2)
    finally:
        stop.set()
        for worker in workers:
            worker.join(30)

    assert code == 0, server.lines[-10:]
    assert ready_http == 503 and ready_grpc in NOT_READY_GRPC, (ready_http, ready_grpc)
    assert exited - signalled < GRACE_S + 3
    assert len(heavy_answer.encodings) == 1
    # Before the signal: answered or (not yet admitted) refused. After it, a call the servers
    # received but never handed to the engine may also end unanswered as they stop: a
    # keep-alive HTTP connection closed, a gRPC call cancelled by the gRPC server's stop. Never
    # a 5xx but 503; admitted work is answered (the heavy call, and those queued behind it).
    unanswered = ("closed:", str(grpc.StatusCode.CANCELLED))
    failures = [
        o
        for o in outcomes
        if o.result not in ("ok", "refused")
        and (o.started < signalled or not o.result.startswith(unanswered))
    ]
    assert not failures, failures[:5]
    ok_before = {o.protocol for o in outcomes if o.result == "ok" and o.started < signalled}
    assert ok_before == {"http", "grpc"}
    # Queued behind the heavy call at the signal, these were admitted and then answered.
    assert any(o.result == "ok" and o.started < signalled < o.ended for o in outcomes)
    names = [line.get("event") for line in server.lines if line.get("event")]
    assert names.index("server.draining") < names.index("server.stopped")
    (drain,) = server.events("server.draining")
    assert drain["signal"] == "SIGTERM" and drain["grace_s"] == GRACE_S


def test_bad_flag_is_a_clear_error_naming_the_setting(capsys: pytest.CaptureFixture[str]) -> None:
    from service.process.cli import build_parser

    args = build_parser().parse_args(["serve", "--http-port", "70000", "--device", "tpu"])
    assert args.run(args) == 2
    out = capsys.readouterr().out
    assert "http_port" in out and "65535" in out
    assert "device" in out and "tpu" in out
    assert "Value error" not in out and "Input should" not in out  # pydantic's words


def test_flag_wins_over_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from service.process.cli import build_parser
    from service.process.serve import settings_from_args

    monkeypatch.setenv("RNNSERVE_GRPC_PORT", "9100")
    monkeypatch.setenv("RNNSERVE_HTTP_PORT", "9000")
    monkeypatch.setenv("RNNSERVE_STRICT_READINESS", "false")
    args = build_parser().parse_args(["serve", "--http-port", "9001", "--models", "a,b"])
    settings = settings_from_args(args)
    assert (settings.http_port, settings.grpc_port) == (9001, 9100)
    assert settings.models == ["a", "b"] and settings.strict_readiness is False
    args = build_parser().parse_args(
        ["serve", "--strict-readiness", "--version-policies", '{"a": "all"}']
    )
    settings = settings_from_args(args)
    assert settings.strict_readiness is True and settings.version_policies == {"a": "all"}


def test_a_taken_port_is_a_clean_startup_failure(tmp_path: Path) -> None:
    write_model(tmp_path, "enc", input_type="features", input_size=FEATURES)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        command = [
            sys.executable,
            "-m",
            "service.process.cli",
            "serve",
            "--repository",
            str(tmp_path),
        ]
        command += ["--http-port", "0", "--grpc-port", str(port), "--log-format", "json"]
        done = subprocess.run(
            command,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert done.returncode == 1
    lines = [json.loads(line) for line in done.stderr.splitlines() if line.startswith("{")]
    (failed,) = [line for line in lines if line.get("event") == "server.failed"]
    assert failed["level"] == "ERROR" and str(port) in failed["reason"]
    assert "Traceback" not in done.stderr
