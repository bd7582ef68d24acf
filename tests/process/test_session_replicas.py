"""Portable state across real server processes: a token from one replica resumes on another.

Two real `rnnserve serve` processes on loopback ports share RNNSERVE_STATE_KEY (two replicas
behind one Service). A stream alternates between them chunk by chunk and must end where encoding
the whole sequence ends. (A server with another key refusing a token: tests/core/test_sessions.py.)
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from tests.factories import write_model
from tests.support import ROOT

SHARED_KEY = "replica-shared-state-key-0123456789"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _start(repository: Path, key: str, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = _free_port()
    env = dict(os.environ)
    env.update(
        RNNSERVE_REPOSITORY=str(repository),
        RNNSERVE_HTTP_PORT=str(port),
        RNNSERVE_GRPC_PORT=str(_free_port()),
        RNNSERVE_DEVICE="cpu",
        RNNSERVE_CPU_THREADS="1",
        RNNSERVE_STATE_KEY=key,
        PYTHONPATH=str(ROOT),
    )
    process = subprocess.Popen(
        [str(Path(sys.executable).parent / "rnnserve"), "serve"],
        env=env,
        stdout=subprocess.DEVNULL,
        # NOTE: a file, not a pipe: nobody reads a pipe while the test runs, and a full one
        # would block the server's logging.
        stderr=log.open("wb"),
    )
    return process, f"http://127.0.0.1:{port}"


def _wait_ready(process: subprocess.Popen[bytes], url: str, log: Path, deadline: float) -> None:
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited: {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"{url}/readyz", timeout=1.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{url} not ready")


@pytest.fixture(scope="module")
def replicas(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    repository = tmp_path_factory.mktemp("repository")
    write_model(repository, "stream", cell="gru", num_layers=2, pooling="mean", head=["x", "y"])
    logs = {name: repository.parent / f"server-{name}.log" for name in ("a", "b")}
    started = {name: _start(repository, SHARED_KEY, log) for name, log in logs.items()}
    try:
        deadline = time.monotonic() + 90
        for name, (process, url) in started.items():
            _wait_ready(process, url, logs[name], deadline)
        yield {name: url for name, (_, url) in started.items()}
    finally:
        for process, _ in started.values():
            process.terminate()
        for process, _ in started.values():
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)


def _post(url: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(url, json=body, timeout=30.0)


def test_token_round_trips_across_two_server_processes(replicas: dict[str, str]) -> None:
    sequence = np.random.default_rng(7).standard_normal((31, 8)).astype(np.float32)
    token: str | None = None
    answer: dict[str, Any] = {}
    for index, start in enumerate(range(0, 31, 6)):
        replica = replicas["a" if index % 2 == 0 else "b"]
        body: dict[str, Any] = {"inputs": sequence[start : start + 6].tolist()}
        if token is not None:
            body["state_token"] = token
        reply = _post(f"{replica}/v1/models/stream/stream", body)
        assert reply.status_code == 200, reply.text
        answer = reply.json()
        token = answer["state_token"]
    whole = _post(f"{replicas['b']}/v1/models/stream/encode", {"inputs": [sequence.tolist()]})
    assert answer["steps"] == 31
    np.testing.assert_allclose(
        answer["encoding"], whole.json()["encodings"][0], rtol=1e-4, atol=1e-5
    )
    np.testing.assert_allclose(answer["scores"], whole.json()["scores"][0], rtol=1e-4, atol=1e-5)


def test_server_held_session_resumes_on_another_replica(replicas: dict[str, str]) -> None:
    sequence = np.random.default_rng(8).standard_normal((20, 8)).astype(np.float32)
    opened = _post(f"{replicas['a']}/v1/models/stream/sessions", {"return_state": True}).json()
    first = _post(
        f"{replicas['a']}/v1/sessions/{opened['session_id']}/chunks",
        {"inputs": sequence[:12].tolist()},
    ).json()
    # Replica A goes away (or the client is routed elsewhere): B resumes from the token.
    resumed = _post(
        f"{replicas['b']}/v1/models/stream/sessions", {"state_token": first["state_token"]}
    )
    assert resumed.status_code == 201 and resumed.json()["steps"] == 12
    last = _post(
        f"{replicas['b']}/v1/sessions/{resumed.json()['session_id']}/chunks",
        {"inputs": sequence[12:].tolist()},
    ).json()
    whole = _post(f"{replicas['a']}/v1/models/stream/encode", {"inputs": [sequence.tolist()]})
    np.testing.assert_allclose(last["encoding"], whole.json()["encodings"][0], rtol=1e-4, atol=1e-5)
    # The session on A was never closed by B: A still knows it.
    assert httpx.get(f"{replicas['a']}/v1/sessions/{opened['session_id']}").status_code == 200
