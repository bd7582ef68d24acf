"""The HTTP edge against a real uvicorn server: what a hostile or careless client can cost.

Bodies refused by their JSON value count before parsing, answers refused by their size before
compute, deadlines for a request's headers and body (raw sockets), made-up versions adding no
metric series, management of names that are not on disk, and the repository as a boundary
(symbolic links leading out of it are refused; links inside it, as Kubernetes makes, work).
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.factories import write_model
from tests.support import TOKEN, live_server, metric_value

pytestmark = pytest.mark.timeout(120)

FEATURES = 2
HIDDEN = 8  # encodings of 8 numbers


@pytest.fixture
def repository(tmp_path: Path) -> Path:
    root = tmp_path / "repository"
    write_model(root, "enc", input_size=FEATURES, hidden_size=HIDDEN)
    return root


def _rows(count: int) -> bytes:
    return b'{"inputs":[[' + b",".join([b"[0.5,0.5]"] * count) + b"]]}"


# --- bounded parsing ---------------------------------------------------------------------------


def test_a_body_of_too_many_json_values_is_413_before_parsing(repository: Path) -> None:
    with (
        live_server(repository, max_request_values=2048) as live,
        httpx.Client(base_url=live.url, timeout=30) as client,
    ):
        refused = client.post("/v1/models/enc/encode", content=_rows(2000))
        assert refused.status_code == 413, refused.text
        error = refused.json()["error"]
        assert error["type"] == "PayloadTooLarge" and error["field"] == "body"
        assert "6,003 JSON values" in error["message"] and "2,048" in error["message"]
        data = ",".join(["0.5"] * 4000)
        v2_body = '{"inputs":[{"name":"INPUT","datatype":"FP32","shape":[1,2000,2],"data":[%s]}]}'
        v2_refused = client.post("/v2/models/enc/infer", content=(v2_body % data).encode())
        assert v2_refused.status_code == 413
        assert v2_refused.json()["error"].startswith("body: about 4,010 JSON values")
        # The same values as binary tensor data are not parsed one by one: accepted.
        header = b'{"inputs":[{"name":"INPUT","datatype":"FP32","shape":[1,2000,2],'
        header += b'"parameters":{"binary_data_size":16000}}]}'
        binary = client.post(
            "/v2/models/enc/infer",
            content=header + np.full(4000, 0.5, "<f4").tobytes(),
            headers={"Inference-Header-Content-Length": str(len(header))},
        )
        assert binary.status_code == 200, binary.text
        assert client.post("/v1/models/enc/encode", content=_rows(600)).status_code == 200
        counted = metric_value(
            client.get("/metrics").text,
            "rnnserve_requests_total",
            model="enc",
            endpoint="encode",
            outcome="invalid_input",
        )
        assert counted == 1


def test_a_sequence_longer_than_the_model_takes_is_refused_unread(repository: Path) -> None:
    write_model(repository, "short", input_size=FEATURES, serving={"max_sequence_length": 16})
    with (
        live_server(repository) as live,
        httpx.Client(base_url=live.url, timeout=30) as client,
    ):
        refused = client.post("/v1/models/short/encode", content=_rows(17))
        assert refused.status_code == 400
        assert refused.json()["error"]["message"] == (
            "inputs[0]: 17 steps; this model's max_sequence_length is 16"
        )
        # An unknown model's body is never read: 404 whatever it holds.
        assert client.post("/v1/models/ghost/encode", content=b"{not json").status_code == 404


def test_an_answer_over_the_limit_is_refused_before_compute(repository: Path) -> None:
    # 4096 bytes: 256 numbers as JSON (16 bytes each), 1024 as binary tensors (4 bytes each).
    with (
        live_server(repository, max_answer_bytes=4096) as live,
        httpx.Client(base_url=live.url, timeout=30) as client,
    ):
        # 30 steps × 8 numbers × 16 bytes = 3,840 fits; 40 steps (5,120) do not.
        fits = [[[0.5, 0.5]] * 20, [[0.5, 0.5]] * 10]
        ok = client.post("/v1/models/enc/encode", json={"inputs": fits, "pooling": "none"})
        assert ok.status_code == 200, ok.text
        inputs = [[[0.5, 0.5]] * 20, [[0.5, 0.5]] * 20]
        none = client.post("/v1/models/enc/encode", json={"inputs": inputs, "pooling": "none"})
        assert none.status_code == 400
        error = none.json()["error"]
        assert error["field"] == "inputs"
        assert "5,120 bytes (320 numbers)" in error["message"]
        assert "4,096 bytes (--max-answer-bytes)" in error["message"]
        assert "pooled encoding" in error["message"]
        mean = client.post("/v1/models/enc/encode", json={"inputs": inputs, "pooling": "mean"})
        assert mean.status_code == 200
        # V2 pads per-step encodings to the longest row: 2 × 20 × 8 numbers.
        tensor = {
            "name": "INPUT",
            "datatype": "FP32",
            "shape": [2, 20, 2],
            "data": [0.5] * 80,
        }
        body = {"inputs": [tensor], "parameters": {"pooling": "none"}}
        as_json = client.post("/v2/models/enc/infer", json=body)
        assert as_json.status_code == 400
        assert "5,120 bytes" in as_json.json()["error"]
        body["parameters"] = {"pooling": "none", "binary_data_output": True}
        as_binary = client.post("/v2/models/enc/infer", json=body)
        assert as_binary.status_code == 200, as_binary.text
        assert (
            metric_value(
                client.get("/metrics").text,
                "rnnserve_requests_total",
                model="enc",
                outcome="invalid_input",
            )
            == 2
        )


# --- deadlines of a request's head and body (raw sockets) ---------------------------------------


def _answer(sock: socket.socket) -> bytes:
    """What the server sends until it closes (the first line is enough)."""
    data = b""
    try:
        while chunk := sock.recv(4096):
            data += chunk
    except ConnectionResetError:
        pass
    return data


def _open(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port))
    sock.settimeout(20)
    return sock


def test_requests_that_never_finish_are_cut_off(repository: Path) -> None:
    with live_server(repository, http_header_timeout_s=0.5, http_body_timeout_s=0.5) as live:
        start = time.monotonic()
        with _open(live.port) as idle:
            assert _answer(idle) == b""  # never spoke: closed, nothing to answer
        assert time.monotonic() - start < 10
        with _open(live.port) as half:
            half.sendall(b"POST /v1/models/enc/encode HTTP/1.1\r\nHost: x\r\n")
            assert _answer(half).startswith(b"HTTP/1.1 408 ")
        with _open(live.port) as trickle:
            trickle.sendall(
                b"POST /v1/models/enc/encode HTTP/1.1\r\nHost: x\r\ncontent-length: 100\r\n\r\n"
            )
            deadline = time.monotonic() + 10
            answer = b""
            trickle.settimeout(0.2)
            while not answer and time.monotonic() < deadline:
                try:
                    trickle.sendall(b" ")
                    answer = trickle.recv(4096) or b"(closed)"
                except TimeoutError:
                    continue
                except OSError:
                    answer = b"(reset)"
            assert answer.startswith(b"HTTP/1.1 408 "), answer
        # The server serves on.
        assert httpx.get(f"{live.url}/healthz", timeout=10).status_code == 200


def test_a_kept_alive_connections_later_requests_have_their_own_deadlines(
    repository: Path,
) -> None:
    with (
        live_server(repository, http_header_timeout_s=0.5, http_body_timeout_s=0.5) as live,
        _open(live.port) as sock,
    ):
        for _ in range(3):  # answered within their deadlines, one after the other
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            answer = b""
            while not answer.endswith(b'{"status":"ok"}'):
                answer += sock.recv(4096)
            assert answer.startswith(b"HTTP/1.1 200 ")
            time.sleep(0.3)
        start = time.monotonic()
        sock.sendall(b"POST /v1/models/enc/encode HTTP/1.1\r\nHost: x\r\ncontent-length: 9\r\n\r\n")
        assert _answer(sock).startswith(b"HTTP/1.1 408 ")
        assert time.monotonic() - start < 4  # its own body deadline, not the keep-alive's 5 s


def test_a_large_body_on_a_slow_link_is_not_cut(repository: Path) -> None:
    # 160 KiB over ~1.6 s against a 0.5 s deadline: each 64 KiB received earns a second more.
    body = _rows(100)
    body += b" " * (160 * 1024 - len(body))
    with (
        live_server(repository, http_header_timeout_s=0.5, http_body_timeout_s=0.5) as live,
        _open(live.port) as sock,
    ):
        sock.sendall(
            b"POST /v1/models/enc/encode HTTP/1.1\r\nHost: x\r\nconnection: close\r\n"
            b"content-length: " + str(len(body)).encode() + b"\r\n\r\n"
        )
        for start in range(0, len(body), 10 * 1024):
            sock.sendall(body[start : start + 10 * 1024])
            time.sleep(0.1)
        assert _answer(sock).startswith(b"HTTP/1.1 200 ")


def test_a_request_head_over_64_kib_is_431(repository: Path) -> None:
    with live_server(repository) as live, _open(live.port) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: ")
        with pytest.raises(OSError):
            for _ in range(64):  # 4 MiB at most, until the server hangs up
                sock.sendall(b"a" * 65536)
        assert _answer(sock).startswith(b"HTTP/1.1 431 ")


# --- metric series, management of names not on disk ----------------------------------------------


def test_made_up_versions_add_no_metric_series(repository: Path) -> None:
    with (
        live_server(repository) as live,
        httpx.Client(base_url=live.url, timeout=30) as client,
    ):
        body = {"inputs": [[[0.5, 0.5]]]}
        for version in range(100_000, 100_020):
            path = f"/v1/models/enc/versions/{version}/encode"
            assert client.post(path, json=body).status_code == 404
            assert client.get(f"/v2/models/enc/versions/{version}/ready").status_code == 404
            assert client.post(f"/v2/models/enc/versions/{version}/infer", json={}).status_code
        text = client.get("/metrics").text
        # NOTE: a label value starts with a quote (a latency sum's digits may hold "1000").
        assert '"1000' not in text
        # Counted all the same, under the model with a blank version.
        assert (
            metric_value(
                text, "rnnserve_requests_total", model="enc", version="", endpoint="encode"
            )
            == 20
        )


def test_loading_a_name_not_on_disk_leaves_nothing_listed(repository: Path) -> None:
    auth = {"authorization": f"Bearer {TOKEN}"}
    with (
        live_server(
            repository, management_enabled=True, management_token=TOKEN, models=["enc", "gone"]
        ) as live,
        httpx.Client(base_url=live.url, timeout=30, headers=auth) as client,
    ):
        assert client.post("/v1/management/models/ghost/load").status_code == 404
        assert client.post("/v2/repository/models/ghost2/load").status_code == 404
        names = [m["name"] for m in client.get("/v1/models").json()["models"]]
        assert names == ["enc", "gone"]  # a model it was told to serve stays, with its error
        assert client.get("/v1/models/ghost").status_code == 404
        # A model that never loaded can be unloaded, and then leaves the listing.
        assert client.post("/v1/management/models/gone/unload").status_code == 200
        assert [m["name"] for m in client.get("/v1/models").json()["models"]] == ["enc"]


# --- the repository is a boundary ---------------------------------------------------------------


def test_links_out_of_the_repository_are_refused_and_links_inside_work(tmp_path: Path) -> None:
    root = tmp_path / "repository"
    outside = tmp_path / "elsewhere"
    write_model(root, "plain", input_size=FEATURES)
    # Out: a model folder, a version folder, one file.
    write_model(outside, "model", input_size=FEATURES)
    (root / "model-link").symlink_to(outside / "model")
    (root / "version-link").mkdir()
    (root / "version-link" / "1").symlink_to(outside / "model" / "1")
    file_link = write_model(root, "file-link", input_size=FEATURES)
    (file_link / "model.safetensors").unlink()
    (file_link / "model.safetensors").symlink_to(outside / "model" / "1" / "model.safetensors")
    # In: a Kubernetes ConfigMap/Secret volume (name → ..data/name, ..data → timestamped folder).
    write_model(root / "..2026_12_07_10_00_00.123", "mounted", input_size=FEATURES)
    (root / "..data").symlink_to("..2026_12_07_10_00_00.123")
    (root / "mounted").symlink_to(Path("..data") / "mounted")
    # A checkpoint that fails for another reason: its reason names no host path either.
    broken = write_model(root, "broken", input_size=FEATURES)
    (broken / "config.json").write_text("{")

    with (
        live_server(root) as live,
        httpx.Client(base_url=live.url, timeout=30) as client,
    ):
        listing = client.get("/v1/models")
        models = {m["name"]: m for m in listing.json()["models"]}
        assert set(models) == {
            "plain",
            "mounted",
            "model-link",
            "version-link",
            "file-link",
            "broken",
        }
        states = {name: [v["state"] for v in m["versions"]] for name, m in models.items()}
        assert states["plain"] == states["mounted"] == ["READY"]
        assert states["version-link"] == states["file-link"] == states["broken"] == ["FAILED"]
        assert models["model-link"]["versions"] == []
        assert "model-link" in models["model-link"]["architecture"]["error"]
        assert "outside the model repository" in models["model-link"]["architecture"]["error"]
        reasons = {name: m["versions"][0]["reason"] for name, m in models.items() if m["versions"]}
        assert reasons["version-link"].startswith("version-link/1: resolves outside")
        assert reasons["file-link"].startswith("file-link/1/model.safetensors: resolves outside")
        assert reasons["broken"].startswith("broken/1/config.json: malformed JSON")
        for text in (listing.text, client.post("/v2/repository/index").text):
            assert str(tmp_path) not in text and os.sep + "elsewhere" not in text
        encoded = client.post("/v1/models/mounted/encode", content=_rows(3))
        assert encoded.status_code == 200 and json.loads(encoded.text)["model"] == "mounted"
