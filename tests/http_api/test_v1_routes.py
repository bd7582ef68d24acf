"""rnnserve's REST API against a real uvicorn server and real checkpoints."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
import pytest
import torch

from models import checkpoint
from service.core import errors
from service.http_api.errors import HTTP_STATUS
from tests.support import (
    TOKEN,
    LiveServer,
    live_server,
    metric_value,
    write_test_repository,
)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    repository = tmp_path_factory.mktemp("rest-repository")
    write_test_repository(repository)
    with live_server(repository) as live:
        yield live


@pytest.fixture(scope="module")
def client(server: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c


def reference_encode(
    repository: Path, name: str, version: int, seqs: list[np.ndarray], pooling: str | None = None
) -> tuple[np.ndarray, np.ndarray | None]:
    """The model's own answer, computed directly from the checkpoint."""
    loaded = checkpoint.load(repository / name / str(version))
    tensors = [torch.from_numpy(s) for s in seqs]
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.int64)
    padded = torch.nn.utils.rnn.pad_sequence(tensors, batch_first=True)
    with torch.inference_mode():
        out = loaded.model(padded, lengths, pooling=pooling)
    scores = None if out.scores is None else out.scores.numpy()
    return out.encodings.numpy(), scores


def error_of(response: httpx.Response) -> dict[str, str]:
    body = response.json()
    assert set(body) == {"error"}, body
    detail: dict[str, str] = body["error"]
    assert isinstance(detail["message"], str) and "Traceback" not in detail["message"]
    return detail


# ---------------------------------------------------------------- inference


def test_encode_features_matches_the_model(client: httpx.Client, server: LiveServer) -> None:
    rng = np.random.default_rng(0)
    seqs = [rng.standard_normal((n, 8)).astype(np.float32) for n in (3, 7, 1)]
    r = client.post("/v1/models/feat/encode", json={"inputs": [s.tolist() for s in seqs]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "feat" and body["version"] == 2
    expected, scores = reference_encode(server.repository, "feat", 2, seqs)
    np.testing.assert_allclose(np.array(body["encodings"]), expected, rtol=1e-4, atol=1e-5)
    assert scores is not None
    np.testing.assert_allclose(np.array(body["scores"]), scores, rtol=1e-4, atol=1e-5)
    assert body["labels"] == [["neg", "pos"][i] for i in scores.argmax(axis=1)]


def test_encode_version_and_pooling_none(client: httpx.Client, server: LiveServer) -> None:
    seqs = [np.full((n, 8), 0.25, dtype=np.float32) for n in (2, 4)]
    r = client.post(
        "/v1/models/feat/versions/1/encode",
        json={"inputs": [s.tolist() for s in seqs], "pooling": "none"},
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["version"] == 1
    assert [len(e) for e in body["encodings"]] == [2, 4]
    expected, _ = reference_encode(server.repository, "feat", 1, seqs, pooling="none")
    np.testing.assert_allclose(np.array(body["encodings"][1]), expected[1], rtol=1e-4, atol=1e-5)


def test_encode_tokens_and_texts(client: httpx.Client) -> None:
    r = client.post("/v1/models/tok/encode", json={"tokens": [[1, 2, 3], [4]], "pooling": "mean"})
    assert r.status_code == 200, r.text
    assert len(r.json()["encodings"]) == 2 and len(r.json()["encodings"][0]) == 16
    r = client.post("/v1/models/words/encode", json={"texts": ["hello there", "ok"]})
    assert r.status_code == 200, r.text
    assert len(r.json()["encodings"][0]) == 32  # bidirectional: hidden × 2


def test_generate_and_stream_agree(client: httpx.Client) -> None:
    r = client.post("/v1/models/translit/generate", json={"texts": ["abc", "hello"]})
    assert r.status_code == 200, r.text
    outputs = r.json()["outputs"]
    assert len(outputs) == 2 and all(len(o["tokens"]) <= 8 for o in outputs)
    assert all(isinstance(o["text"], str) for o in outputs)

    events: list[tuple[str, dict[str, object]]] = []
    with client.stream(
        "POST", "/v1/models/translit/generate", json={"texts": ["abc", "hello"], "stream": True}
    ) as stream:
        assert stream.status_code == 200
        assert stream.headers["content-type"].startswith("text/event-stream")
        for block in stream.iter_text():
            events.extend(parse_sse(block))
    kinds = [k for k, _ in events]
    assert kinds[-1] == "result" and set(kinds[:-1]) <= {"token"}
    final = events[-1][1]
    assert final["outputs"] == outputs
    for index, out in enumerate(outputs):
        streamed = [d["token"] for k, d in events if k == "token" and d["index"] == index]
        assert streamed == out["tokens"]


def parse_sse(text: str) -> list[tuple[str, dict[str, object]]]:
    out = []
    for block in text.strip().split("\n\n"):
        if not block:
            continue
        lines = dict(line.split(": ", 1) for line in block.splitlines())
        out.append((lines["event"], orjson.loads(lines["data"])))
    return out


def test_stream_errors_before_the_first_token_get_their_status(client: httpx.Client) -> None:
    r = client.post("/v1/models/nope/generate", json={"texts": ["a"], "stream": True})
    assert r.status_code == 404
    assert error_of(r)["type"] == "NotFound"


# ---------------------------------------------------------------- models, health, metrics, docs


def test_models_list_and_describe(client: httpx.Client) -> None:
    r = client.get("/v1/models")
    assert r.status_code == 200
    names = {m["name"] for m in r.json()["models"]}
    assert {"feat", "tok", "words", "translit", "broken"} <= names
    feat = client.get("/v1/models/feat").json()
    assert sorted(v["version"] for v in feat["versions"]) == [1, 2]
    assert all(v["state"] == "READY" for v in feat["versions"])
    assert feat["architecture"]
    broken = client.get("/v1/models/broken").json()
    assert broken["versions"][0]["state"] == "FAILED"
    assert broken["versions"][0]["reason"]
    assert client.get("/v1/models/feat/versions/1").status_code == 200
    assert client.get("/v1/models/feat/versions/9").status_code == 404


def test_health_ready_and_metrics(client: httpx.Client) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    # Relaxed readiness in this fixture: the broken model does not make the server unready.
    assert client.get("/readyz").status_code == 200
    client.post("/v1/models/feat/encode", json={"inputs": [[[0.0] * 8]]})
    text = client.get("/metrics").text
    assert 'rnnserve_requests_total{endpoint="encode",model="feat",outcome="success"' in text
    assert 'protocol="rest"' in text


COUNTED: list[tuple[str, Any, str, str, int]] = [
    # (method and path, JSON body or raw bytes, model and endpoint labels, status)
    # A bad {version} is refused while FastAPI reads the path: the route never runs.
    ("POST /v1/models/feat/versions/1_0/encode", {"inputs": [[[0.0] * 8]]}, "feat", "encode", 400),
    (
        "POST /v1/models/translit/versions/+1/generate",
        {"inputs": ["ab"]},
        "translit",
        "generate",
        400,
    ),
    ("POST /v2/models/feat/versions/0/infer", {"inputs": []}, "feat", "infer", 400),
    ("POST /v1/models/feat/versions/x/sessions", {}, "feat", "session_open", 400),
    ("POST /v1/models/feat/versions/%201/stream", {"inputs": [[0.0] * 8]}, "feat", "stream", 400),
    ("POST /v1/management/models/feat/versions/2x/load", b"", "feat", "load", 400),
    ("POST /v1/management/models/feat/versions/-1/unload", b"", "feat", "unload", 400),
    ("GET /v1/models/feat/versions/x", b"", "feat", "get_model", 400),
    ("GET /v2/models/feat/versions/x", b"", "feat", "model_metadata", 400),
    ("GET /v2/models/feat/versions/x/ready", b"", "feat", "model_ready", 400),
    # Bodies refused before the work starts, and management while it is disabled.
    ("POST /v1/models/feat/sessions", b"[1]", "feat", "session_open", 400),
    ("POST /v1/models/feat/stream", {"inputs": "no"}, "feat", "stream", 400),
    ("POST /v1/sessions/no-such-session/chunks", b"{", "", "session_chunk", 400),
    ("GET /v1/sessions/no-such-session", b"", "", "session_get", 404),
    ("DELETE /v1/sessions/no-such-session", b"", "", "session_close", 404),
    ("POST /v1/management/models/feat/reload", b"", "feat", "reload", 403),
    ("POST /v2/repository/models/feat/load", b"", "feat", "repository_load", 403),
    ("POST /v2/repository/index", b"", "", "repository_index", 403),
    # The model-status routes, counted as gRPC counts its GetModel, ModelMetadata, ...
    ("GET /v1/models", b"", "", "list_models", 200),
    ("GET /v1/models/feat", b"", "feat", "get_model", 200),
    ("GET /v2/models/feat", b"", "feat", "model_metadata", 200),
    ("GET /v2/models/feat/ready", b"", "feat", "model_ready", 200),
]


@pytest.mark.parametrize(
    ("route", "body", "model", "endpoint", "status"), COUNTED, ids=[r[0] for r in COUNTED]
)
def test_requests_are_counted_refused_or_not(
    client: httpx.Client, route: str, body: Any, model: str, endpoint: str, status: int
) -> None:
    # NOTE: a refusal that bypassed the counter hid bad clients from 4xx-rate alerts.
    labels = {"model": model, "endpoint": endpoint}
    if status >= 400:
        labels["version"] = ""
    before = client.get("/metrics").text
    method, path = route.split(" ")
    content = body if isinstance(body, bytes) else orjson.dumps(body)
    r = client.request(method, path, content=content)
    assert r.status_code == status, r.text
    after = client.get("/metrics").text
    counted = metric_value(after, "rnnserve_requests_total", **labels) - metric_value(
        before, "rnnserve_requests_total", **labels
    )
    assert counted == 1, (r.status_code, r.text)


def test_a_chunked_body_over_the_limit_counts_as_the_clients_fault(client: httpx.Client) -> None:
    labels = {"model": "feat", "endpoint": "stream", "outcome": "invalid_input"}
    before = metric_value(client.get("/metrics").text, "rnnserve_requests_total", **labels)

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit trips while reading
        yield b'{"inputs": ['
        for _ in range(40):
            yield b"[" + b"0.0," * 2000 + b"0.0],"

    r = client.post("/v1/models/feat/stream", content=chunks())
    assert r.status_code == 413, r.text
    after = metric_value(client.get("/metrics").text, "rnnserve_requests_total", **labels)
    assert after == before + 1


def test_refusals_for_made_up_models_add_no_metric_series(client: httpx.Client) -> None:
    # NOTE: every distinct name would otherwise be a new series, which a client could grow
    # without bound (the session routes did).
    paths = (
        "/v1/models/made-up-1/sessions",
        "/v1/models/made-up-2/stream",
        "/v1/models/made-up-3/versions/1/sessions",
        "/v1/models/made-up-4/versions/1x/encode",
        "/v1/management/models/made-up-5/load",
    )
    blank = {"model": "", "version": ""}
    before = metric_value(client.get("/metrics").text, "rnnserve_requests_total", **blank)
    for path in paths:
        assert 400 <= client.post(path, json={"inputs": [[0.0] * 8]}).status_code < 500
    text = client.get("/metrics").text
    assert "made-up" not in text
    # Counted all the same, under blank labels.
    assert metric_value(text, "rnnserve_requests_total", **blank) == before + len(paths)


def test_docs_work_offline(client: httpx.Client) -> None:
    html = client.get("/docs").text
    assert "http://" not in html and "https://" not in html
    assert "/docs/static/swagger-ui-bundle.js" in html
    assert client.get("/docs/static/swagger-ui-bundle.js").status_code == 200
    assert client.get("/docs/static/swagger-ui.css").status_code == 200
    spec = client.get("/openapi.json").json()
    encode = spec["paths"]["/v1/models/{name}/encode"]["post"]
    ref = encode["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    schema = spec["components"]["schemas"][ref.rsplit("/", 1)[1]]
    assert schema["examples"] and "inputs" in schema["properties"]
    assert "422" not in encode["responses"] and "400" in encode["responses"]
    for path in ("/v2/models/{name}/infer", "/v1/models/{name}/generate", "/readyz", "/metrics"):
        assert path in spec["paths"]


# ---------------------------------------------------------------- errors

# pydantic's own phrasing, which a client should never read.
PYDANTIC_WORDS = ("Value error", "Input should", "Field required", "Extra inputs", "validation")


@pytest.mark.parametrize(
    ("path", "body", "message"),
    [
        (
            "/v1/models/feat/encode",
            {},
            "body: exactly one of 'inputs', 'tokens', 'texts' is required, got none",
        ),
        (
            "/v1/models/words/encode",
            {"texts": ["a"], "tokens": [[1]]},
            "body: exactly one of 'inputs', 'tokens', 'texts' is required, got ['tokens', 'texts']",
        ),
        (
            "/v1/models/words/encode",
            {"texts": ["a"], "pooling": "avg"},
            "pooling: must be one of 'last', 'mean', 'max' or 'none', got 'avg'",
        ),
        (
            "/v1/models/words/encode",
            {"texts": ["a"], "timeout_ms": 0},
            "timeout_ms: must be greater than 0, got 0",
        ),
        (
            "/v1/models/words/encode",
            {"texts": ["a"], "timeout_ms": 3_600_001},
            "timeout_ms: must be at most 3600000, got 3600001",
        ),
        (
            "/v1/models/words/encode",
            {"texts": ["a"], "text": "a"},
            "text: is not a field of this body",
        ),
        (
            "/v1/models/translit/generate",
            {"texts": ["a"], "stream": "yes"},
            "stream: expected true or false, got 'yes'",
        ),
        (
            "/v1/models/translit/generate",
            {"texts": ["a"], "max_length": 2.5},
            "max_length: expected an integer, got 2.5",
        ),
        (
            "/v1/models/feat/stream",
            {"inputs": [[1.0] * 8], "state_token": ""},
            "state_token: is empty; leave it out to start a new stream",
        ),
        (
            "/v1/models/feat/sessions",
            {"state_token": ""},
            "state_token: is empty; leave it out to start a new stream",
        ),
        (
            "/v1/models/feat/stream",
            {},
            "body: exactly one of 'inputs', 'tokens', 'text' is required, got none",
        ),
    ],
)
def test_refusals_are_in_the_projects_words(
    client: httpx.Client, path: str, body: dict[str, object], message: str
) -> None:
    r = client.post(path, json=body)
    assert r.status_code == 400, r.text
    detail = error_of(r)
    assert detail["message"] == message
    assert detail["field"] == message.split(":")[0]
    assert not any(words in detail["message"] for words in PYDANTIC_WORDS)


def test_an_empty_state_token_is_refused_not_a_new_stream(client: httpx.Client) -> None:
    first = client.post("/v1/models/feat/stream", json={"inputs": [[0.5] * 8]})
    assert first.status_code == 200, first.text
    assert first.json()["steps"] == 1
    # A client that lost its token must hear so, not get a stream silently restarted at step 1.
    again = client.post("/v1/models/feat/stream", json={"inputs": [[0.5] * 8], "state_token": ""})
    assert again.status_code == 400 and error_of(again)["field"] == "state_token"


def test_an_unknown_model_names_the_closest_or_the_known_ones(client: httpx.Client) -> None:
    known = sorted(m["name"] for m in client.get("/v1/models").json()["models"])
    r = client.post("/v1/models/Feat/encode", json={"inputs": [[[1.0] * 8]]})
    assert r.status_code == 404
    assert error_of(r)["message"] == "model 'Feat' is not known; did you mean 'feat'?"
    r = client.post("/v1/models/zzzz/encode", json={"inputs": [[[1.0] * 8]]})
    assert error_of(r)["message"] == f"model 'zzzz' is not known (known: {', '.join(known)})"
    r = client.get("/v1/models/translt")
    assert error_of(r)["message"] == "model 'translt' is not known; did you mean 'translit'?"
    v2 = {"inputs": [{"name": "INPUT", "datatype": "FP32", "shape": [1, 1, 8], "data": [0] * 8}]}
    r = client.post("/v2/models/FEAT/infer", json=v2)
    assert r.status_code == 404
    assert r.json() == {"error": "model 'FEAT' is not known; did you mean 'feat'?"}


@pytest.mark.parametrize(
    ("path", "body", "status", "field", "fragment"),
    [
        ("/v1/models/nope/encode", {"inputs": [[[1.0]]]}, 404, None, "nope"),
        ("/v1/models/feat/versions/7/encode", {"inputs": [[[1.0] * 8]]}, 404, None, "7"),
        ("/v1/models/feat/encode", {"inputs": [[[1.0] * 8]] * 9}, 400, "inputs", "8"),
        ("/v1/models/short/encode", {"inputs": [[[1.0] * 4] * 17]}, 400, "inputs[0]", "16"),
        ("/v1/models/feat/encode", {"inputs": [[[1.0] * 7]]}, 400, "inputs[0]", "8 features"),
        (
            "/v1/models/feat/encode",
            {"inputs": [[[1.0] * 8], [[1.0] * 8, [1.0] * 7]]},
            400,
            "inputs[1][1]",
            "expected 8 features, got 7",
        ),
        ("/v1/models/feat/encode", {"inputs": [[[1.0] * 7 + [1e39]]]}, 400, "inputs[0][0][7]", ""),
        ("/v1/models/feat/encode", {"inputs": [[1.0] * 8]}, 400, "inputs[0][0]", "list"),
        ("/v1/models/feat/encode", {"inputs": [[["x"] * 8]]}, 400, "inputs[0][0][0]", "string"),
        ("/v1/models/tok/encode", {"tokens": [[1, 20]]}, 400, "tokens[0][1]", "20"),
        ("/v1/models/tok/encode", {"tokens": [[1, -1]]}, 400, "tokens[0][1]", ""),
        ("/v1/models/words/encode", {"texts": ["x" * 41]}, 400, "texts[0]", "40"),
        ("/v1/models/feat/encode", {"tokens": [[1]]}, 400, "tokens", "inputs"),
        ("/v1/models/feat/encode", {"inputs": [[[1.0] * 8]], "pooling": "sum"}, 400, "pooling", ""),
        ("/v1/models/feat/encode", {"inputs": [[[1.0] * 8]], "polling": "x"}, 400, "polling", ""),
        ("/v1/models/feat/encode", {}, 400, "body", "exactly one"),
        ("/v1/models/feat/generate", {"inputs": [[[1.0] * 8]]}, 400, "model", "encode"),
        (
            "/v1/models/translit/generate",
            {"texts": ["a"], "beam_size": 0},
            400,
            "beam_size",
            "must be between 1 and 16, got 0",
        ),
        # The engine's limit (max_beam_size), not a looser one of the wire schema.
        (
            "/v1/models/translit/generate",
            {"texts": ["a"], "beam_size": 300},
            400,
            "beam_size",
            "must be between 1 and 16, got 300",
        ),
        # Booleans and integers are taken as sent, never coerced from strings or numbers.
        ("/v1/models/translit/generate", {"texts": ["a"], "stream": "yes"}, 400, "stream", ""),
        ("/v1/models/translit/generate", {"texts": ["a"], "stream": 1}, 400, "stream", ""),
        (
            "/v1/models/translit/generate",
            {"texts": ["a"], "max_length": "5"},
            400,
            "max_length",
            "",
        ),
        (
            "/v1/models/feat/encode",
            {"inputs": [[[1.0] * 8]], "timeout_ms": 3_600_001},
            400,
            "timeout_ms",
            "3600000",
        ),
        ("/v1/models/broken/encode", {"inputs": [[[1.0] * 4]]}, 503, None, ""),
    ],
)
def test_errors_name_field_and_limit(
    client: httpx.Client,
    path: str,
    body: dict[str, object],
    status: int,
    field: str | None,
    fragment: str,
) -> None:
    r = client.post(path, json=body)
    assert r.status_code == status, r.text
    detail = error_of(r)
    if field is not None:
        assert detail["field"] == field
        assert detail["message"].startswith(f"{field}: ")
    assert fragment in detail["message"]


def test_bad_json_and_bad_path_parameters(client: httpx.Client) -> None:
    r = client.post("/v1/models/feat/encode", content=b'{"inputs": [[[NaN]]]}')
    assert r.status_code == 400 and error_of(r)["field"] == "body"
    # Digits other than 0-9 ('²', Arabic-Indic '١') are no version either.
    for version in ("abc", "²", "١"):
        r = client.post(
            f"/v1/models/feat/versions/{version}/encode", json={"inputs": [[[1.0] * 8]]}
        )
        assert r.status_code == 400, (version, r.text)
        assert error_of(r)["field"] == "path.version"
    r = client.get("/v1/no/such/route")
    assert r.status_code == 404 and error_of(r)["type"] == "HTTPError"


def test_body_size_limit_declared_and_chunked(client: httpx.Client, server: LiveServer) -> None:
    limit = server.settings.max_body_bytes
    big = b'{"inputs": [[[' + b"0.0," * (limit // 4) + b"0.0]]]}"
    r = client.post("/v1/models/feat/encode", content=big)
    assert r.status_code == 413
    assert str(limit) in error_of(r)["message"]

    def chunks() -> Iterator[bytes]:
        yield big[: limit // 2]
        yield big[limit // 2 :]

    r = client.post("/v1/models/feat/encode", content=chunks())
    assert r.status_code == 413
    assert str(limit) in error_of(r)["message"]


async def test_overloaded_is_503_with_retry_after(server: LiveServer) -> None:
    body = {"inputs": [[[0.5] * 4]]}
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as c:
        answers = await asyncio.gather(
            *(c.post("/v1/models/slow/encode", json=body) for _ in range(6))
        )
    statuses = sorted(r.status_code for r in answers)
    assert 200 in statuses and 503 in statuses, statuses
    refused = next(r for r in answers if r.status_code == 503)
    assert int(refused.headers["retry-after"]) >= 1
    assert error_of(refused)["type"] == "Overloaded"


def test_deadline_is_504(client: httpx.Client) -> None:
    # One microsecond: gone before any batch can start, whatever the load.
    r = client.post("/v1/models/slow/encode", json={"inputs": [[[0.5] * 4]], "timeout_ms": 0.001})
    assert r.status_code == 504, r.text
    assert error_of(r)["type"] == "DeadlineExceeded"


async def test_client_gone_is_never_computed(server: LiveServer) -> None:
    async with httpx.AsyncClient(base_url=server.url, timeout=60) as c:
        before = (await c.get("/metrics")).text
        # Keep the device busy with one long call (one sequence: a batch's step budget is
        # max_batch_size × 128), so that the next request waits in its queue.
        busy = asyncio.create_task(
            c.post("/v1/models/heavy/encode", json={"tokens": [[1, 2, 3, 4] * 2000]})
        )
        await asyncio.sleep(0.05)
        body = orjson.dumps({"inputs": [[[0.5] * 4]]})
        _reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(
            b"POST /v1/models/slow/encode HTTP/1.1\r\nHost: test\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        await writer.drain()
        # NOTE: the heavy call takes ~100 ms here: leave well before it ends.
        await asyncio.sleep(0.02)
        writer.close()
        assert (await busy).status_code == 200
        await asyncio.sleep(0.1)
        after = (await c.get("/metrics")).text
    cancelled = {"model": "slow", "protocol": "rest", "outcome": "cancelled"}
    assert metric_value(after, "rnnserve_requests_total", **cancelled) == 1 + metric_value(
        before, "rnnserve_requests_total", **cancelled
    )
    computed = {"model": "slow"}
    assert metric_value(after, "rnnserve_batch_size_sum", **computed) == metric_value(
        before, "rnnserve_batch_size_sum", **computed
    )


def test_every_core_error_has_an_http_status() -> None:
    assert set(errors.ALL_ERRORS) <= set(HTTP_STATUS)
    assert HTTP_STATUS[errors.InvalidInput] == 400
    assert HTTP_STATUS[errors.NotFound] == 404
    assert HTTP_STATUS[errors.Overloaded] == 503
    assert HTTP_STATUS[errors.DeadlineExceeded] == 504
    assert HTTP_STATUS[errors.NotReady] == 503


# ---------------------------------------------------------------- management


def test_management_is_off_by_default(client: httpx.Client) -> None:
    r = client.post("/v1/management/models/feat/reload", headers={"Authorization": "Bearer x"})
    assert r.status_code == 403
    assert error_of(r)["type"] == "PermissionDenied"


def test_management_with_token(tmp_path: Path) -> None:
    from tests.factories import write_model

    write_model(tmp_path, "m", 1, input_size=4)
    with (
        live_server(tmp_path, management_enabled=True, management_token=TOKEN) as live,
        httpx.Client(base_url=live.url, timeout=30) as c,
    ):
        auth = {"Authorization": f"Bearer {TOKEN}"}
        assert c.post("/v1/management/models/m/unload").status_code == 401
        wrong = c.post("/v1/management/models/m/unload", headers={"Authorization": "Bearer no"})
        assert wrong.status_code == 401 and wrong.headers["www-authenticate"] == "Bearer"
        r = c.post("/v1/management/models/m/unload", headers=auth)
        assert r.status_code == 200, r.text
        assert c.post("/v1/models/m/encode", json={"inputs": [[[1.0] * 4]]}).status_code in (
            404,
            503,
        )
        r = c.post("/v1/management/models/m/load", headers=auth)
        assert r.status_code == 200, r.text
        assert r.json()["model"]["versions"][0]["state"] == "READY"
        assert c.post("/v1/models/m/encode", json={"inputs": [[[1.0] * 4]]}).status_code == 200
        assert c.post("/v1/management/models/m/reload", headers=auth).status_code == 200
        r = c.post("/v1/management/models/m/versions/1/unload", headers=auth)
        assert r.status_code == 200, r.text
        assert c.get("/v1/models/m/versions/1").status_code in (200, 404)
        r = c.post("/v1/management/models/m/versions/1/load", headers=auth)
        assert r.status_code == 200, r.text
        assert c.post("/v1/models/m/versions/1/encode", json={"inputs": [[[1.0] * 4]]}).is_success
        # Names only: no paths, no URLs.
        # (A literal ".." never reaches the server: clients remove dot segments from URLs.)
        for name in ("%2E%2E", "a%2Fb", "a/b", "http%3A%2F%2Fx", "a" * 201, "a" * 256):
            for path in (f"{name}/load", f"{name}/versions/1/unload", f"{name}/reload"):
                r = c.post(f"/v1/management/models/{path}", headers=auth)
                assert r.status_code == 400, (path, r.status_code)
                assert error_of(r)["field"] == "name"
        assert c.post("/v1/management/models/absent/load", headers=auth).status_code == 404


def test_draining_refuses_new_work(tmp_path: Path) -> None:
    from tests.factories import write_model

    write_model(tmp_path, "m", 1, input_size=4)
    with live_server(tmp_path) as live, httpx.Client(base_url=live.url, timeout=30) as c:
        assert c.get("/readyz").status_code == 200
        live.call(live.engine.drain(0.1))
        assert c.get("/readyz").status_code == 503
        assert c.get("/healthz").status_code == 200
        r = c.post("/v1/models/m/encode", json={"inputs": [[[1.0] * 4]]})
        assert r.status_code == 503, r.text
        assert r.headers["retry-after"] and error_of(r)["type"] in ("Draining", "NotReady")
        assert c.get("/v2/health/ready").status_code == 503
