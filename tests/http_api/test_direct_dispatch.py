"""The inference routes served by service/http_api/direct_dispatch.py answer exactly as FastAPI's
stack does.

Two apps over one real engine: the server's (direct dispatch on) and the same app without it; every
case — answers, streams, each kind of error, fall-throughs — must be byte-identical.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson

from service.core.settings import Settings
from service.http_api.app import create_app
from service.http_api.direct_dispatch import DirectDispatch, _DirectRequest
from service.http_api.v1_routes import V1Routes
from service.http_api.v2_routes import V2Routes
from tests.support import StartEngine, write_test_repository

FEATURES = np.random.default_rng(0).standard_normal((2, 5, 8)).astype(np.float32).tolist()
V2_BINARY_HEADER = orjson.dumps(
    {
        "inputs": [
            {
                "name": "INPUT",
                "datatype": "FP32",
                "shape": [1, 3, 8],
                "parameters": {"binary_data_size": 96},
            }
        ],
        "parameters": {"binary_data_output": True},
    }
)

# (path, body, headers): successes, every error kind, and paths the hot routes must not take
CASES: list[tuple[str, bytes, dict[str, str]]] = [
    ("/v1/models/feat/encode", orjson.dumps({"inputs": FEATURES}), {}),
    (
        "/v1/models/feat/versions/1/encode",
        orjson.dumps({"inputs": FEATURES, "pooling": "mean"}),
        {},
    ),
    ("/v1/models/feat/versions/007/encode", orjson.dumps({"inputs": FEATURES}), {}),
    ("/v1/models/feat/versions/x/encode", orjson.dumps({"inputs": FEATURES}), {}),
    ("/v1/models/feat/versions/-1/encode", orjson.dumps({"inputs": FEATURES}), {}),
    ("/v1/models/feat/versions/+1/encode", orjson.dumps({"inputs": FEATURES}), {}),
    ("/v1/models/feat/versions/0/encode", orjson.dumps({"inputs": FEATURES}), {}),
    ("/v1/models/feat/versions/9/encode", orjson.dumps({"inputs": FEATURES}), {}),
    ("/v1/models/nope/encode", orjson.dumps({"inputs": FEATURES}), {}),
    ("/v1/models/feat/encode", b"{not json", {}),
    ("/v1/models/feat/encode", b"", {}),
    ("/v1/models/feat/encode", orjson.dumps({"inputs": [[[1.0, 2.0]]]}), {}),
    ("/v1/models/feat/encode", orjson.dumps({"inputs": FEATURES, "extra": 1}), {}),
    ("/v1/models/feat/encode", orjson.dumps({"tokens": [[1, 2]]}), {}),
    ("/v1/models/tok/encode", orjson.dumps({"tokens": [[1, 2, 3]], "timeout_ms": 0}), {}),
    ("/v1/models/words/encode", orjson.dumps({"texts": ["hello", "x" * 41]}), {}),
    ("/v1/models/translit/generate", orjson.dumps({"texts": ["hello"], "beam_size": 2}), {}),
    ("/v1/models/translit/generate", orjson.dumps({"texts": ["hi"], "stream": True}), {}),
    (
        "/v1/models/translit/versions/1/generate",
        orjson.dumps({"texts": ["a"], "stream": "yes"}),
        {},
    ),
    ("/v1/models/feat/generate", orjson.dumps({"inputs": FEATURES}), {}),
    (
        "/v2/models/feat/infer",
        orjson.dumps(
            {
                "inputs": [
                    {"name": "INPUT", "datatype": "FP32", "shape": [1, 2, 8], "data": [0.5] * 16}
                ]
            }
        ),
        {},
    ),
    (
        "/v2/models/feat/versions/2/infer",
        V2_BINARY_HEADER + np.ones((3, 8), "<f4").tobytes(),
        {"Inference-Header-Content-Length": str(len(V2_BINARY_HEADER))},
    ),
    ("/v2/models/feat/infer", orjson.dumps({"inputs": [{"name": "WRONG"}]}), {}),
    ("/v2/models/nope/versions/1/infer", orjson.dumps({"inputs": []}), {}),
    ("/v1/models/feat/encode/", orjson.dumps({"inputs": FEATURES}), {}),
    ("/v1/models/a/b/encode", orjson.dumps({"inputs": FEATURES}), {}),
    ("/v1/models/feat/encode", b"x" * (300 * 1024), {}),
]


async def _answers(app: Any) -> list[tuple[int, str, bytes]]:
    transport = httpx.ASGITransport(app=app)
    answers = []
    async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=30) as c:
        for path, body, headers in CASES:
            response = await c.post(path, content=body, headers=headers)
            answers.append(
                (response.status_code, response.headers.get("content-type", ""), response.content)
            )
    return answers


async def test_hot_routes_answer_exactly_as_the_fastapi_stack(
    repository: Path, start_engine: StartEngine
) -> None:
    write_test_repository(repository)
    engine = await start_engine(
        version_policy="all",
        strict_readiness=False,
        max_text_length=40,
        max_sequences_per_request=8,
        max_body_bytes=256 * 1024,
    )
    settings: Settings = engine.settings
    hot = await _answers(create_app(engine, settings, engine.metrics))
    plain = await _answers(create_app(engine, settings, engine.metrics, direct_dispatch=False))
    for case, ours, theirs in zip(CASES, hot, plain, strict=True):
        assert ours == theirs, case[0]
    statuses = [status for status, _, _ in hot]
    # The cases cover answers and every error kind (not only one outcome).
    assert {200, 400, 404, 413}.issubset(statuses), statuses


async def test_hot_routes_take_exactly_the_inference_paths(
    repository: Path, start_engine: StartEngine
) -> None:
    write_test_repository(repository)
    engine = await start_engine(version_policy="all", strict_readiness=False)
    settings: Settings = engine.settings
    routes = [
        *V1Routes(engine, settings, engine.metrics).routes(),
        *V2Routes(engine, settings, engine.metrics).routes(),
    ]

    async def below(scope: Any, receive: Any, send: Any) -> None:
        # What would run FastAPI's stack: a distinct answer shows a request fell through.
        await send({"type": "http.response.start", "status": 299, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    hot = DirectDispatch(below, routes=[route for route in routes if route.direct])
    body = orjson.dumps({"inputs": FEATURES})
    served = [
        "/v1/models/feat/encode",
        "/v1/models/feat/versions/2/encode",
        "/v1/models/nope/encode",  # served here, answered 404 by the app's handlers
        "/v1/models/translit/generate",
        "/v2/models/feat/infer",
        "/v2/models/feat/versions/1/infer",
    ]
    passed = [
        "/v1/models/feat/versions/x/encode",
        "/v1/models/feat/versions/-1/encode",
        "/v1/models/feat/versions/0/encode",
        "/v1/models/feat/encode/",
        "/v1/models",
        "/v2/repository/index",
    ]
    transport = httpx.ASGITransport(app=hot)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        for path in served:
            assert (await client.post(path, content=body)).status_code != 299, path
        for path in passed:
            assert (await client.post(path, content=body)).status_code == 299, path
        assert (await client.get("/v1/models/feat/encode")).status_code == 299


async def test_a_direct_requests_body_read_twice_is_the_same_bytes() -> None:
    # A handler or error path that reads the body again must not wait on a spent `receive`.
    messages = [
        {"type": "http.request", "body": b'{"inputs": ', "more_body": True},
        {"type": "http.request", "body": b"[[[1.0]]]}", "more_body": False},
    ]

    async def receive() -> dict[str, Any]:
        return messages.pop(0)

    request = _DirectRequest(
        {"type": "http", "method": "POST", "path": "/", "headers": []}, receive
    )
    assert await request.body() == b'{"inputs": [[[1.0]]]}'
    assert await request.body() == b'{"inputs": [[[1.0]]]}'
    assert not messages
