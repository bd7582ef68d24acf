"""rnnserve_client against a real `rnnserve serve` process, over both wires.

Every call is checked against what the server answers to a plain request (httpx on the REST
API), so the client is shown to carry requests and answers faithfully on REST and on gRPC;
errors, retries of load refusals (with a server whose queue really is full) and fail-over
between addresses are checked by what the server counted.
"""

from __future__ import annotations

import asyncio
import inspect
import re
import socket
import subprocess
import sys
import time
import tomllib
import typing
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from rnnserve_client import (
    AsyncClient,
    Client,
    ConnectionFailed,
    DeadlineExceeded,
    EncodeResult,
    GenerateResult,
    InvalidInput,
    NotFound,
    Overloaded,
    TokenEvent,
)
from tests.factories import write_model
from tests.support import ROOT, ServerProcess, requests_total, running_server

pytestmark = pytest.mark.timeout(120)

FEATURES = 4
HEAVY_STEPS = 10_000  # a second or more of single-thread compute for the 512-unit LSTM "slow"
WIRES = ("http", "grpc")
SLOW_QUEUE = {"model": "slow", "version": "1", "kind": "encode"}


def _repository(root: Path) -> Path:
    write_model(root, "feat", input_size=FEATURES, head=["a", "b", "c"], pooling="mean")
    write_model(root, "tok", input_type="tokens", cell="gru", seed=1)
    write_model(root, "seq", task="seq2seq", input_type="text", cell="gru", attention=True)
    write_model(
        root,
        "slow",
        input_size=FEATURES,
        hidden_size=512,
        serving={"max_batch_size": 1, "max_queue_size": 1, "max_sequence_length": 50_000},
    )
    return root


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with running_server(_repository(tmp_path_factory.mktemp("repo"))) as served:
        yield served


def url_of(server: ServerProcess, wire: str) -> str:
    return server.url if wire == "http" else f"grpc://127.0.0.1:{server.grpc_port}"


def rest(server: ServerProcess, path: str, body: dict[str, Any]) -> Any:
    """The server's own answer to a plain REST request."""
    answer = httpx.post(f"{server.url}{path}", json=body, timeout=60)
    assert answer.status_code == 200, answer.text
    return answer.json()


def _features(seed: int, steps: int = 5) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(steps, FEATURES)).astype(np.float32)


def _requests(server: ServerProcess, **labels: str) -> float:
    """rnnserve_requests_total summed over the series that have these labels."""
    return requests_total(server.url, **labels)


# --- the calls ----------------------------------------------------------------------------------


@pytest.mark.parametrize("wire", WIRES)
def test_encode_carries_every_input_kind_and_answer_part(server: ServerProcess, wire: str) -> None:
    sequences = [_features(1, 5), _features(2, 3)]
    body = {"inputs": [s.tolist() for s in sequences]}
    with Client(url_of(server, wire)) as client:
        result = client.encode("feat", inputs=sequences)
        expected = rest(server, "/v1/models/feat/encode", body)
        assert (result.model, result.version) == ("feat", 1)
        assert isinstance(result.encodings, np.ndarray)
        assert result.encodings.dtype == np.float32 and result.encodings.shape[0] == 2
        np.testing.assert_allclose(result.encodings, expected["encodings"], rtol=1e-5, atol=1e-6)
        assert result.scores is not None
        np.testing.assert_allclose(result.scores, expected["scores"], rtol=1e-5, atol=1e-6)
        assert result.labels == expected["labels"]

        stacked = client.encode("feat", inputs=np.stack([_features(1, 3), _features(2, 3)]))
        assert isinstance(stacked.encodings, np.ndarray) and stacked.encodings.shape[0] == 2
        steps = client.encode("feat", inputs=[_features(3, 5), _features(4, 2)], pooling="none")
        assert isinstance(steps.encodings, list)
        assert [e.shape[0] for e in steps.encodings] == [5, 2]

        tokens = client.encode("tok", tokens=[[1, 2, 3], [4]], version=1)
        expected = rest(server, "/v1/models/tok/versions/1/encode", {"tokens": [[1, 2, 3], [4]]})
        np.testing.assert_allclose(tokens.encodings, expected["encodings"], rtol=1e-5, atol=1e-6)
        assert tokens.labels is None and tokens.scores is None


@pytest.mark.parametrize("wire", WIRES)
def test_generate_and_its_stream(server: ServerProcess, wire: str) -> None:
    texts = ["hello", "abc"]
    expected = rest(server, "/v1/models/seq/generate", {"texts": texts, "beam_size": 2})
    with Client(url_of(server, wire)) as client:
        result = client.generate("seq", texts=texts, beam_size=2)
        assert [o.tokens for o in result] == [o["tokens"] for o in expected["outputs"]]
        assert [o.text for o in result] == [o["text"] for o in expected["outputs"]]
        assert len(result) == 2 and result[0] is result.outputs[0]

        events = list(client.generate_stream("seq", texts=["hello"], max_length=6))
    *tokens, last = events
    assert isinstance(last, GenerateResult) and all(isinstance(t, TokenEvent) for t in tokens)
    assert [t.token for t in tokens] == last[0].tokens and len(last[0].tokens) <= 6
    assert "".join(t.text or "" for t in tokens) == last[0].text


@pytest.mark.parametrize("wire", WIRES)
def test_state_tokens_carry_a_stream_across_calls_and_wires(
    server: ServerProcess, wire: str
) -> None:
    whole = _features(5, 9)
    expected = rest(server, "/v1/models/feat/encode", {"inputs": [whole.tolist()]})
    other = "grpc" if wire == "http" else "http"
    with Client(url_of(server, wire)) as client, Client(url_of(server, other)) as switch:
        token = None
        for i, chunk in enumerate(np.split(whole, [2, 5, 6])):
            result = (switch if i == 2 else client).stream("feat", chunk, token)
            token = result.state_token
            assert token is not None
    assert result.steps == 9
    np.testing.assert_allclose(result.encoding, expected["encodings"][0], rtol=1e-4, atol=1e-5)
    assert result.scores is not None and result.label in ("a", "b", "c")


@pytest.mark.parametrize("wire", WIRES)
def test_session_is_a_context_manager(server: ServerProcess, wire: str) -> None:
    whole = _features(6, 7)
    expected = rest(server, "/v1/models/feat/encode", {"inputs": [whole.tolist()]})
    with Client(url_of(server, wire)) as client:
        with client.session("feat", return_state=True) as session:
            assert session.session_id and session.steps == 0
            for chunk in np.split(whole, [3, 4]):
                result = session.send(chunk)
            assert session.steps == 7 and result.state_token
        np.testing.assert_allclose(result.encoding, expected["encodings"][0], rtol=1e-4, atol=1e-5)
        # Reopened from the token, the stream goes on where it was.
        with client.session("feat", state_token=result.state_token) as resumed:
            assert resumed.steps == 7
            assert resumed.send(_features(7, 1)).steps == 8
        tokens = client.session("tok")
        assert tokens.send([3, 4]).steps == 2
        tokens.close()
    if wire == "http":
        gone = httpx.get(f"{server.url}/v1/sessions/{session.session_id}", timeout=10)
        assert gone.status_code == 404


@pytest.mark.parametrize("wire", WIRES)
def test_models_and_model(server: ServerProcess, wire: str) -> None:
    listed = httpx.get(f"{server.url}/v1/models", timeout=10).json()["models"]
    with Client(url_of(server, wire)) as client:
        models = client.models()
        assert sorted(m.name for m in models) == sorted(m["name"] for m in listed)
        seq = client.model("seq")
    assert seq.ready and [v.version for v in seq.versions] == [1]
    assert seq.architecture == next(m for m in listed if m["name"] == "seq")["architecture"]


@pytest.mark.parametrize("wire", WIRES)
async def test_async_client_makes_the_same_calls(server: ServerProcess, wire: str) -> None:
    sequence = _features(8, 6)
    async with AsyncClient(url_of(server, wire)) as client:
        encoded, generated = await asyncio.gather(
            client.encode("feat", inputs=[sequence]), client.generate("seq", texts=["hi"])
        )
        events = [event async for event in client.generate_stream("seq", texts=["hi"])]
        first = await client.stream("feat", sequence[:2])
        second = await client.stream("feat", sequence[2:], first.state_token)
        async with client.session("feat") as session:
            await session.send(sequence[:4])
            last = await session.send(sequence[4:])
        assert (await client.model("feat")).ready and len(await client.models()) == 4
    expected = rest(server, "/v1/models/feat/encode", {"inputs": [sequence.tolist()]})
    np.testing.assert_allclose(encoded.encodings, expected["encodings"], rtol=1e-5, atol=1e-6)
    assert events[-1] == generated
    for result in (second, last):
        assert result.steps == 6
        np.testing.assert_allclose(result.encoding, expected["encodings"][0], rtol=1e-4, atol=1e-5)


# --- errors and retries -------------------------------------------------------------------------


@pytest.mark.parametrize("wire", WIRES)
def test_bad_input_names_the_field_and_is_never_retried(server: ServerProcess, wire: str) -> None:
    protocol = "rest" if wire == "http" else "grpc"
    labels = {"model": "feat", "protocol": protocol, "endpoint": "encode"}
    before = _requests(server, **labels, outcome="invalid_input")
    with Client(url_of(server, wire)) as client:
        with pytest.raises(InvalidInput) as caught:
            client.encode("feat", inputs=[np.zeros((3, FEATURES + 1))])
        with pytest.raises(NotFound, match="'nope'"):
            client.encode("nope", inputs=[_features(1)])
    # The server's own words, as a plain request gets them.
    plain = httpx.post(
        f"{server.url}/v1/models/feat/encode",
        json={"inputs": [np.zeros((3, FEATURES + 1)).tolist()]},
        timeout=10,
    ).json()["error"]
    assert (str(caught.value), caught.value.field) == (plain["message"], plain["field"])
    assert caught.value.url == url_of(server, wire)
    assert _requests(server, **labels, outcome="invalid_input") == before + 1 + (wire == "http")


def _hold_slow_model(server: ServerProcess, pool: ThreadPoolExecutor) -> list[Future[Any]]:
    """Keep "slow" busy: one long sequence computing and the queue (one sequence) full behind
    it, until the returned calls finish."""
    heavy = {"inputs": [np.zeros((HEAVY_STEPS, FEATURES)).tolist()]}
    light = {"inputs": [_features(9).tolist()]}
    calls: list[Future[Any]] = []
    deadline = time.monotonic() + 30
    for body in (heavy, light, light):
        calls.append(pool.submit(rest, server, "/v1/models/slow/encode", body))
        while server.metric("rnnserve_inflight_requests", model="slow") < len(calls):
            assert time.monotonic() < deadline, "a call that holds the model was not admitted"
            time.sleep(0.02)
        # NOTE: the batcher takes the first call (and the next batch) out of the queue in its
        # own turn; only a sequence still queued after that fills it.
        time.sleep(0.2)
        if len(calls) > 1 and server.metric("rnnserve_queue_depth", **SLOW_QUEUE) >= 1:
            return calls
    raise AssertionError("the slow model's queue never filled")


def _refusals(server: ServerProcess, protocol: str) -> float:
    return _requests(server, model="slow", protocol=protocol, outcome="overloaded")


@pytest.mark.parametrize("wire", WIRES)
def test_load_refusals_are_retried_after_retry_after(server: ServerProcess, wire: str) -> None:
    protocol = "rest" if wire == "http" else "grpc"
    labels = {"model": "slow", "protocol": protocol, "endpoint": "encode"}
    refused = _refusals(server, protocol)
    # NOTE: on a loaded machine the long call may end before this one arrives; then it was
    # simply answered, and the model is held again (the refusal is what is tested).
    for _ in range(3):
        answered = _requests(server, **labels, outcome="success")
        with ThreadPoolExecutor(4) as pool, Client(url_of(server, wire), timeout=60) as client:
            held = _hold_slow_model(server, pool)
            result = client.encode("slow", inputs=[_features(10)])
            for call in held:
                call.result(60)
        if _refusals(server, protocol) > refused:
            break
    assert result.encodings.shape[0] == 1
    # The first try met a full queue, a later one was answered: the server counted both.
    assert _refusals(server, protocol) > refused
    # Answered once (the calls that held the model are REST calls of their own).
    held_here = len(held) if protocol == "rest" else 0
    assert _requests(server, **labels, outcome="success") == answered + 1 + held_here


def test_a_deadline_shorter_than_retry_after_ends_the_call_at_once(
    server: ServerProcess,
) -> None:
    caught: Overloaded | None = None
    for _ in range(3):
        with ThreadPoolExecutor(4) as pool, Client(server.url) as client:
            held = _hold_slow_model(server, pool)
            started = time.monotonic()
            try:
                # REST's Retry-After is whole seconds (at least 1): more than this call has.
                client.encode("slow", inputs=[_features(11)], timeout=0.5)
            except Overloaded as exc:
                caught, elapsed = exc, time.monotonic() - started
            except DeadlineExceeded:
                pass  # admitted (the long call ended first), then out of time: hold again
            for call in held:
                call.result(60)
        if caught is not None:
            break
    assert caught is not None, "never refused"
    assert caught.retry_after_s >= 1 and elapsed < 0.5
    assert "queue full" in str(caught)


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.parametrize("wire", WIRES)
def test_a_list_of_addresses_is_round_robin_with_fail_over(
    server: ServerProcess, wire: str
) -> None:
    dead = f"{'http' if wire == 'http' else 'grpc'}://127.0.0.1:{_closed_port()}"
    with Client([dead, url_of(server, wire)], timeout=30) as client:
        results = [client.encode("feat", inputs=[_features(12)]) for _ in range(6)]
    assert all(r.encodings.shape == results[0].encodings.shape for r in results)
    with Client([dead], timeout=2, max_attempts=3) as alone, pytest.raises(ConnectionFailed):
        alone.models()


def test_the_client_package_needs_no_torch() -> None:
    # Importing every module of the client loads no torch (the server's stack stays out).
    code = (
        "import sys, rnnserve_client, rnnserve_client.aio, rnnserve_client.proto.inference."
        "grpc_service_pb2_grpc; print(sorted(m for m in ('torch', 'service', 'models') "
        "if m in sys.modules))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.strip() == "[]"
    project = tomllib.loads((ROOT / "client" / "pyproject.toml").read_text())["project"]
    names = {re.split(r"[<>=!~ ;\[]", dep, maxsplit=1)[0] for dep in project["dependencies"]}
    assert names == {"grpcio", "protobuf", "httpx", "numpy"}


def test_both_clients_show_each_call_with_its_own_parameters() -> None:
    # What help(), editors and type hints show of a call: its parameters and docstring, the
    # same on both clients; the asyncio ones awaitable (generate_stream: `async for`).
    calls = ("encode", "generate", "generate_stream", "stream", "session", "models", "model")
    for name in calls:
        blocking, awaitable = getattr(Client, name), getattr(AsyncClient, name)
        assert blocking.__name__ == awaitable.__name__ == name
        assert blocking.__doc__ and blocking.__doc__ == awaitable.__doc__
        shown = inspect.signature(blocking).parameters
        assert next(iter(shown)) == "self" and shown == inspect.signature(awaitable).parameters
    bound = inspect.signature(Client("http://127.0.0.1:1").encode).parameters
    assert list(bound) == ["model", "inputs", "tokens", "texts", "pooling", "version", "timeout"]
    assert typing.get_type_hints(Client.encode)["return"] is EncodeResult
    assert inspect.isgeneratorfunction(Client.generate_stream)
    assert inspect.iscoroutinefunction(AsyncClient.encode)
    assert inspect.isasyncgenfunction(AsyncClient.generate_stream)
