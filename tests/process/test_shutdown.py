"""SIGTERM as a pod sees it: `rnnserve serve` in a real process must end its whole drain — work,
streams, sessions, both servers — within `--drain-grace-s`, answer what it cuts off with
503 / UNAVAILABLE naming the shutdown (never a bare 500), unload its models and exit 0.
"""

from __future__ import annotations

import queue
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest

from rnnserve_client.proto.inference import grpc_service_pb2 as v2
from rnnserve_client.proto.inference import grpc_service_pb2_grpc as v2_grpc
from rnnserve_client.proto.rnnserve.v1 import rnnserve_pb2 as pb
from rnnserve_client.proto.rnnserve.v1 import rnnserve_pb2_grpc as pb_grpc
from tests.factories import write_model
from tests.support import ServerProcess, running_server

FEATURES = 4
pytestmark = pytest.mark.timeout(180)

GRACE_S = 1.0
# ~6 s of single-thread compute for the 512-unit LSTM (far more than the grace).
LONG_STEPS = 48_000


def _repository(root: Path) -> Path:
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


def _features(seed: int, steps: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(steps, FEATURES)).astype(np.float32)


def _grpc_heavy(port: int) -> tuple[grpc.StatusCode, str]:
    request = pb.EncodeRequest(model="heavy")
    seq = _features(7, LONG_STEPS)
    request.inputs.sequences.add(shape=seq.shape, values=seq.ravel().tolist())
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            pb_grpc.RnnServeStub(channel).Encode(request, timeout=60)
        except grpc.RpcError as exc:
            return exc.code(), exc.details()  # type: ignore[attr-defined]
    return grpc.StatusCode.OK, ""


def _http_heavy(url: str, seed: int) -> httpx.Response:
    body = {"inputs": [_features(seed, LONG_STEPS).tolist()]}
    return httpx.post(f"{url}/v1/models/heavy/encode", json=body, timeout=60)


def _requests(inbox: queue.Queue[Any]) -> Iterator[Any]:
    """A client stream fed from `inbox` (None ends it)."""
    while (message := inbox.get()) is not None:
        yield message


def _outcome(stream: Iterator[Any]) -> tuple[list[Any], grpc.StatusCode, str]:
    """Every reply of a stream and how it ended."""
    replies: list[Any] = []
    try:
        for reply in stream:
            replies.append(reply)
    except grpc.RpcError as exc:
        return replies, exc.code(), exc.details()  # type: ignore[attr-defined]
    return replies, grpc.StatusCode.OK, ""


def _wait_inflight(server: ServerProcess, model: str, count: int) -> None:
    deadline = time.monotonic() + 60
    while server.metric("rnnserve_inflight_requests", model=model) < count:
        assert time.monotonic() < deadline, "the long requests were never admitted"
        time.sleep(0.02)


def test_sigterm_cuts_work_and_streams_at_the_grace_and_exits_zero(tmp_path: Path) -> None:
    repository = _repository(tmp_path / "repo")
    with running_server(repository, "--drain-grace-s", str(GRACE_S)) as server:
        session_in: queue.Queue[Any] = queue.Queue()
        infer_in: queue.Queue[Any] = queue.Queue()
        with (
            grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel,
            ThreadPoolExecutor(6) as pool,
        ):
            api = pb_grpc.RnnServeStub(channel)
            # A session open and idle at the signal.
            session_in.put(pb.SessionRequest(open=pb.SessionOpen(model="enc")))
            session = pool.submit(_outcome, api.StreamSession(_requests(session_in), timeout=60))
            # A ModelStreamInfer stream that got one answer and then idles.
            request = v2.ModelInferRequest(model_name="enc")
            tensor = request.inputs.add(name="INPUT", datatype="FP32", shape=[1, 2, FEATURES])
            tensor.contents.fp32_contents.extend([0.5] * (2 * FEATURES))
            infer_in.put(request)
            infer = pool.submit(
                _outcome,
                v2_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer(
                    _requests(infer_in), timeout=60
                ),
            )
            # Three encodes of ~6 s each, admitted before the signal.
            over_http = [pool.submit(_http_heavy, server.url, seed) for seed in (1, 2)]
            over_grpc = pool.submit(_grpc_heavy, server.grpc_port)
            _wait_inflight(server, "heavy", 3)
            signalled = time.monotonic()
            server.process.send_signal(signal.SIGTERM)
            code = server.process.wait(30)
            exited = time.monotonic()
            session_in.put(None)
            infer_in.put(None)
            http_answers = [f.result(30) for f in over_http]
            grpc_answer = over_grpc.result(30)
            session_replies, session_code, session_details = session.result(30)
            infer_replies, infer_code, infer_details = infer.result(30)
        time.sleep(0.2)  # the log reader catches up

    assert code == 0, server.lines[-10:]
    # The whole drain fits in the grace (before: 8.45 s with a grace of 1 s).
    assert exited - signalled < GRACE_S + 1.0, exited - signalled
    for answer in http_answers:
        assert answer.status_code == 503, answer.text
        error = answer.json()["error"]
        assert error["type"] == "Draining" and "shutting down" in error["message"], error
    assert grpc_answer[0] == grpc.StatusCode.UNAVAILABLE and "shutting down" in grpc_answer[1]
    # Streams open at the signal end UNAVAILABLE, naming the shutdown (not NOT_FOUND, not
    # "model is not known").
    assert len(session_replies) == 1 and session_replies[0].HasField("opened")
    assert session_code == grpc.StatusCode.UNAVAILABLE and "shutting down" in session_details
    assert len(infer_replies) == 1 and not infer_replies[0].error_message
    assert infer_code == grpc.StatusCode.UNAVAILABLE and "shutting down" in infer_details
    messages = [str(line.get("message", line.get("raw", ""))) for line in server.lines]
    assert any("unloaded model heavy version 1" in m for m in messages), messages[-20:]
    assert any("unloaded model enc version 1" in m for m in messages), messages[-20:]
    (stopped,) = server.events("server.stopped")
    assert stopped["compute_finished"] is False  # the long call was left to the exit
    text = "\n".join(messages)
    assert "Traceback" not in text
    assert "never retrieved" not in text
    assert "timeout graceful shutdown exceeded" not in text


def test_open_rest_sessions_get_unavailable_while_the_server_drains(tmp_path: Path) -> None:
    repository = _repository(tmp_path / "repo")
    with (
        running_server(repository, "--drain-grace-s", "20") as server,
        ThreadPoolExecutor(1) as pool,
    ):
        opened = httpx.post(f"{server.url}/v1/models/enc/sessions", json={}, timeout=10)
        assert opened.status_code in (200, 201), opened.text
        session_id = opened.json()["session_id"]
        # A long call admitted before the signal keeps the drain going (an idle server exits
        # at once, possibly before the chunk below is sent).
        heavy = pool.submit(_http_heavy, server.url, 3)
        _wait_inflight(server, "heavy", 1)
        server.process.send_signal(signal.SIGTERM)
        # While it drains, the session's next chunk hears why it is refused.
        answer = None
        with httpx.Client(base_url=server.url, timeout=5) as client:
            for _ in range(50):
                answer = client.post(
                    f"/v1/sessions/{session_id}/chunks", json={"inputs": [[0.1] * FEATURES]}
                )
                if answer.status_code == 503:
                    break
                time.sleep(0.01)
        finished = heavy.result(60)
        code = server.process.wait(30)
    assert answer is not None and answer.status_code == 503, answer and answer.text
    assert "shutting down" in answer.json()["error"]["message"]
    # The call admitted before the signal was answered within the grace.
    assert finished.status_code == 200, finished.text
    assert code == 0


def test_an_idle_server_with_an_open_session_exits_quickly(tmp_path: Path) -> None:
    repository = _repository(tmp_path / "repo")
    with running_server(repository, "--drain-grace-s", "20") as server:
        opened = httpx.post(f"{server.url}/v1/models/enc/sessions", json={}, timeout=10)
        assert opened.status_code in (200, 201), opened.text
        signalled = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        code = server.process.wait(30)
        exited = time.monotonic()
    assert code == 0
    # Nothing ran: no need to wait for the grace.
    assert exited - signalled < 5.0
