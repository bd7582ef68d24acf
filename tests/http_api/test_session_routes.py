"""The REST session routes in-process (httpx over ASGI) on the real engine: answers and errors."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi import FastAPI

from service.core.sessions import SessionManager
from service.core.settings import Settings
from service.http_api.app import create_app
from tests.factories import write_model
from tests.support import Served


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    repository: Path = tmp_path_factory.mktemp("repository")
    write_model(repository, "tagger", cell="lstm", num_layers=2, pooling="mean", head=["a", "b"])
    write_model(repository, "tokens", cell="gru", input_type="tokens", reset_after=False)
    write_model(repository, "bidirectional", cell="gru", bidirectional=True)
    write_model(repository, "twice", version=1, cell="rnn", seed=1)
    write_model(repository, "twice", version=2, cell="rnn", seed=2)
    server = Served(repository, version_policies={"twice": "all"})
    yield server
    server.close()


def _app(served: Served, sessions: SessionManager) -> FastAPI:
    return create_app(served.engine, Settings(repository=Path(".")), served.metrics, sessions)


def _calls(served: Served, sessions: SessionManager, *calls: tuple[str, str, Any]) -> list[Any]:
    """Run HTTP calls in order on the engine's loop; return (status, json, headers) of each."""

    async def go() -> list[Any]:
        transport = httpx.ASGITransport(app=_app(served, sessions))
        out = []
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            for method, url, body in calls:
                reply = await client.request(method, url, json=body)
                out.append((reply.status_code, reply.json(), reply.headers))
        return out

    return served.run(go())


def _features(length: int, seed: int) -> list[list[float]]:
    return np.random.default_rng(seed).standard_normal((length, 8)).astype(np.float32).tolist()


def test_session_over_rest_equals_whole_encode(served: Served) -> None:
    sequence = _features(23, 1)
    (status, opened, _), *_ = _calls(
        served, served.sessions, ("POST", "/v1/models/tagger/sessions", {"return_state": True})
    )
    assert status == 201 and opened["steps"] == 0 and opened["pooling"] == "mean"
    sid = opened["session_id"]
    chunks = [sequence[:5], sequence[5:6], sequence[6:23]]
    replies = _calls(
        served,
        served.sessions,
        *[("POST", f"/v1/sessions/{sid}/chunks", {"inputs": c}) for c in chunks],
        ("POST", "/v1/models/tagger/encode", {"inputs": [sequence]}),
        ("GET", f"/v1/sessions/{sid}", None),
        ("DELETE", f"/v1/sessions/{sid}", None),
        ("POST", f"/v1/sessions/{sid}/chunks", {"inputs": chunks[0]}),
    )
    *chunked, whole, looked, closed, gone = replies
    assert [r[0] for r in chunked] == [200, 200, 200]
    assert [r[1]["steps"] for r in chunked] == [5, 6, 23]
    last = chunked[-1][1]
    np.testing.assert_allclose(last["encoding"], whole[1]["encodings"][0], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(last["scores"], whole[1]["scores"][0], rtol=1e-4, atol=1e-5)
    assert last["label"] == whole[1]["labels"][0]
    assert isinstance(last["state_token"], str)
    assert looked[0] == 200 and looked[1]["steps"] == 23
    assert closed[0] == 200
    assert gone[0] == 404 and gone[1]["error"]["type"] == "NotFound"


def test_stateless_stream_carries_state_in_the_token(served: Served) -> None:
    tokens = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5]
    token = None
    result: dict[str, Any] = {}
    for start in range(0, len(tokens), 4):
        body: dict[str, Any] = {"tokens": tokens[start : start + 4], "pooling": "max"}
        if token is not None:
            body["state_token"] = token
        ((status, result, _),) = _calls(
            served, served.sessions, ("POST", "/v1/models/tokens/stream", body)
        )
        assert status == 200
        token = result["state_token"]
    ((_, whole, _),) = _calls(
        served,
        served.sessions,
        ("POST", "/v1/models/tokens/encode", {"tokens": [tokens], "pooling": "max"}),
    )
    assert result["steps"] == len(tokens)
    np.testing.assert_allclose(result["encoding"], whole["encodings"][0], rtol=1e-4, atol=1e-5)


def _tampered(token: str) -> str:
    """`token` with one byte of its sealed state flipped, re-encoded as valid base64url: only
    the integrity check (not the text decoding) can refuse it."""
    raw = bytearray(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    raw[len(raw) // 2] ^= 0x01  # inside the state arrays, well before the MAC
    return base64.urlsafe_b64encode(bytes(raw)).rstrip(b"=").decode("ascii")


def test_refusals_map_to_clear_http_errors(served: Served) -> None:
    ((_, first, _),) = _calls(
        served, served.sessions, ("POST", "/v1/models/tokens/stream", {"tokens": [1, 2]})
    )
    token = first["state_token"]
    tampered = _tampered(token)
    replies = _calls(
        served,
        served.sessions,
        ("POST", "/v1/models/bidirectional/sessions", {}),
        ("POST", "/v1/models/tagger/stream", {"inputs": [[0.0] * 8], "state_token": token}),
        ("POST", "/v1/models/tokens/stream", {"tokens": [1], "state_token": tampered}),
        ("POST", "/v1/models/tokens/stream", {"tokens": [1], "state_token": token[:20]}),
        ("POST", "/v1/models/tagger/stream", {"inputs": [[0.0] * 7]}),
        ("POST", "/v1/models/tagger/stream", {"inputs": [[0.0] * 8], "tokens": [1]}),
        ("POST", "/v1/models/tagger/stream", {"inputs": [[0.0] * 8], "pooling": "sum"}),
        ("POST", "/v1/models/nope/sessions", {}),
        ("POST", "/v1/sessions/not-a-session/chunks", {"tokens": [1]}),
    )
    statuses = [r[0] for r in replies]
    assert statuses == [400, 400, 400, 400, 400, 400, 400, 404, 404]
    bi, wrong_model, tampered_reply, truncated, width, both, pooling, _, _ = (
        r[1]["error"] for r in replies
    )
    assert bi["field"] == "model"
    assert "bidirectional encoder" in bi["message"] and "cannot be streamed" in bi["message"]
    assert wrong_model["field"] == "state_token"
    assert wrong_model["message"] == (
        "state_token: was issued for model 'tokens' version 1, not 'tagger' version 1"
    )
    assert tampered_reply == {
        "type": "StateTokenError",
        "message": "state_token: failed its integrity check (tampered)",
        "field": "state_token",
    }
    assert truncated["field"] == "state_token"
    assert truncated["message"] == "state_token: is truncated"
    assert width["field"].startswith("inputs") and "8" in width["message"]
    assert "exactly one" in both["message"]
    assert pooling["field"] == "pooling"


def test_session_routes_read_json_whatever_the_content_type(served: Served) -> None:
    """`curl -d '{...}'` sends form Content-Type; like encode, the JSON body is still read."""
    form = {"Content-Type": "application/x-www-form-urlencoded"}

    async def go() -> list[tuple[int, Any]]:
        transport = httpx.ASGITransport(app=_app(served, served.sessions))
        out: list[tuple[int, Any]] = []
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:

            async def post(url: str, content: bytes, headers: dict[str, str]) -> Any:
                reply = await client.post(url, content=content, headers=headers)
                out.append((reply.status_code, reply.json()))
                return reply.json()

            chunk = b'{"inputs": [[0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5]]}'
            opened = await post("/v1/models/tagger/sessions", b'{"pooling": "max"}', form)
            await post("/v1/models/tagger/sessions", b"", {})
            await post(f"/v1/sessions/{opened['session_id']}/chunks", chunk, form)
            await post("/v1/models/tagger/stream", chunk, form)
            await post("/v1/models/tagger/versions/1/stream", chunk, {})
            await post("/v1/models/tagger/stream", b"[1]", form)
            await post("/v1/models/tagger/stream", b"", form)
            await client.delete(f"/v1/sessions/{opened['session_id']}")
        return out

    replies = served.run(go())
    assert [status for status, _ in replies] == [201, 201, 200, 200, 200, 400, 400]
    assert replies[0][1]["pooling"] == "max" and replies[1][1]["steps"] == 0
    assert replies[2][1]["steps"] == 1 and replies[3][1]["steps"] == 1
    assert replies[5][1]["error"] == {
        "type": "InvalidInput",
        "message": "body: expected a JSON object",
        "field": "body",
    }
    assert "exactly one" in replies[6][1]["error"]["message"]


def test_chunk_errors_name_the_chunk_fields(served: Served) -> None:
    """A chunk is one sequence in `inputs`/`tokens`/`text`: no batch index, no `texts`."""
    replies = _calls(
        served,
        served.sessions,
        ("POST", "/v1/models/tokens/stream", {"text": "abc"}),
        ("POST", "/v1/models/tagger/stream", {"inputs": [[0.0] * 7]}),
        ("POST", "/v1/models/tagger/stream", {"inputs": [[0.0] * 8, [0.0] * 7]}),
    )
    assert [r[0] for r in replies] == [400, 400, 400]
    kind, width, step = (r[1]["error"] for r in replies)
    assert kind["field"] == "text"
    assert kind["message"] == "text: this model reads tokens input; send 'tokens' instead"
    assert width["field"] == "inputs" and width["message"].startswith("inputs: ")
    assert step["field"] == "inputs[1]" and "8" in step["message"]


def test_session_limit_answers_503_with_retry_after(served: Served) -> None:
    sessions = served.manager(max_sessions=1)
    replies = _calls(
        served,
        sessions,
        ("POST", "/v1/models/tagger/sessions", {}),
        ("POST", "/v1/models/tagger/sessions", {}),
    )
    assert [r[0] for r in replies] == [201, 503]
    assert "max_sessions" in replies[1][1]["error"]["message"]
    assert float(replies[1][2]["retry-after"]) >= 1
    served.run(sessions.stop())


def test_expired_session_answers_404_expired(served: Served) -> None:
    sessions = served.manager(idle_timeout_s=0.05)
    ((_, opened, _),) = _calls(served, sessions, ("POST", "/v1/models/tagger/sessions", {}))
    served.run(asyncio.sleep(0.2))
    ((status, body, _),) = _calls(
        served,
        sessions,
        ("POST", f"/v1/sessions/{opened['session_id']}/chunks", {"inputs": [[0.0] * 8]}),
    )
    assert status == 404
    assert body["error"]["message"] == (
        f"session '{opened['session_id']}' expired after 0.05 s idle; open a new session "
        "(or resume it from its last state_token)"
    )
    served.run(sessions.stop())


def test_a_token_from_a_server_with_another_key_is_refused(served: Served) -> None:
    ((_, first, _),) = _calls(
        served, served.sessions, ("POST", "/v1/models/tokens/stream", {"tokens": [1, 2]})
    )
    other = served.manager(key=b"another-replica-key-0123456789")
    body = {"tokens": [3], "state_token": first["state_token"]}
    replies = _calls(
        served,
        other,
        ("POST", "/v1/models/tokens/stream", body),
        ("POST", "/v1/models/tokens/sessions", {"state_token": first["state_token"]}),
    )
    assert [r[0] for r in replies] == [400, 400]
    for _, reply, _ in replies:
        assert reply["error"]["field"] == "state_token"
        assert "different server key" in reply["error"]["message"]
        assert "RNNSERVE_STATE_KEY" in reply["error"]["message"]
    assert other.active == 0
    served.run(other.stop())


def test_a_token_of_another_version_is_refused(served: Served) -> None:
    chunk = {"inputs": [[0.5] * 8] * 3}
    ((status, first, _),) = _calls(
        served, served.sessions, ("POST", "/v1/models/twice/versions/1/stream", chunk)
    )
    assert status == 200 and first["version"] == 1
    resumed = {**chunk, "state_token": first["state_token"]}
    wrong, right = _calls(
        served,
        served.sessions,
        ("POST", "/v1/models/twice/versions/2/stream", resumed),
        ("POST", "/v1/models/twice/versions/1/stream", resumed),
    )
    assert wrong[0] == 400
    assert wrong[1]["error"]["message"] == (
        "state_token: was issued for model 'twice' version 1, not 'twice' version 2"
    )
    assert right[0] == 200 and right[1]["steps"] == 6
