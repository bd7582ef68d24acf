"""Management has one set of rules: every case runs on REST and on gRPC, and both must agree.

Each table below is a list of management calls (operation, Authorization values, model name,
V2 repository parameters) under one server configuration. Every call is made once through the
HTTP app (in process) and once through a real grpc.aio server on the same engine, each time from
the same state (the model loaded), and the two outcomes must be the same.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from prometheus_client import CollectorRegistry

from rnnserve_client.proto.inference import grpc_service_pb2 as v2
from rnnserve_client.proto.inference import grpc_service_pb2_grpc as v2_grpc
from rnnserve_client.proto.rnnserve.v1 import rnnserve_pb2 as pb
from rnnserve_client.proto.rnnserve.v1 import rnnserve_pb2_grpc as pb_grpc
from service.core.engine import Engine
from service.core.metrics import Metrics
from service.core.settings import Settings
from service.grpc_api.server import create_grpc_server
from service.http_api.app import create_app
from tests.factories import write_model

pytestmark = pytest.mark.timeout(120)

TOKEN = "mgmt-t0ken"
MODEL = "m"
OPERATIONS = ("index", "v2_load", "v2_unload", "v1_load", "v1_unload", "v1_reload")
AUTHORIZATIONS: list[list[str]] = [
    [],
    [f"Bearer {TOKEN}"],
    [f"bearer {TOKEN}"],
    [f"BEARER {TOKEN}"],
    [f"Bearer   {TOKEN}"],
    ["Bearer wrong"],
    [f"Basic {TOKEN}"],
    [f"Bearer{TOKEN}"],
    ["Bearer"],
    [TOKEN],
    [f"Bearer {TOKEN}", f"Bearer {TOKEN}"],
    [f"Bearer {TOKEN}", "Bearer wrong"],
    ["Bearer wrong", f"Bearer {TOKEN}"],
]
PARAMETERS: list[dict[str, Any] | None] = [
    None,
    {},
    {"unload_dependents": True},
    {"unload_dependents": "yes"},
    {"config": "{}"},
    {"file:1/model.safetensors": "AAAA"},
]
# The outcome classes both wires are compared by.
HTTP_OUTCOME = {
    200: "ok",
    400: "invalid",
    401: "unauthenticated",
    403: "denied",
    404: "not_found",
    409: "conflict",
    503: "unavailable",
}
GRPC_OUTCOME = {
    grpc.StatusCode.OK: "ok",
    grpc.StatusCode.INVALID_ARGUMENT: "invalid",
    grpc.StatusCode.UNAUTHENTICATED: "unauthenticated",
    grpc.StatusCode.PERMISSION_DENIED: "denied",
    grpc.StatusCode.NOT_FOUND: "not_found",
    grpc.StatusCode.FAILED_PRECONDITION: "conflict",
    grpc.StatusCode.UNAVAILABLE: "unavailable",
}


@dataclass(frozen=True)
class Call:
    operation: str
    authorization: tuple[str, ...]
    name: str = MODEL
    parameters: dict[str, Any] | None = None


@dataclass
class Wires:
    engine: Engine
    http: httpx.AsyncClient
    channel: grpc.aio.Channel

    async def rest(self, call: Call) -> str:
        headers = [("authorization", value) for value in call.authorization]
        if call.operation == "index":
            response = await self.http.post("/v2/repository/index", headers=headers)
        elif call.operation.startswith("v2_"):
            action = call.operation.removeprefix("v2_")
            body = b"" if call.parameters is None else json.dumps({"parameters": call.parameters})
            path = f"/v2/repository/models/{call.name}/{action}"
            response = await self.http.post(path, content=body, headers=headers)
        else:
            action = call.operation.removeprefix("v1_")
            path = f"/v1/management/models/{call.name}/{action}"
            response = await self.http.post(path, headers=headers)
        return HTTP_OUTCOME.get(response.status_code, str(response.status_code))

    async def grpc(self, call: Call) -> str:
        metadata = tuple(("authorization", value) for value in call.authorization)
        api = pb_grpc.RnnServeStub(self.channel)
        inference = v2_grpc.GRPCInferenceServiceStub(self.channel)
        parameters = {name: _parameter(value) for name, value in (call.parameters or {}).items()}
        rpc: Any
        if call.operation == "index":
            rpc = inference.RepositoryIndex(v2.RepositoryIndexRequest(), metadata=metadata)
        elif call.operation == "v2_load":
            request = v2.RepositoryModelLoadRequest(model_name=call.name, parameters=parameters)
            rpc = inference.RepositoryModelLoad(request, metadata=metadata)
        elif call.operation == "v2_unload":
            unload = v2.RepositoryModelUnloadRequest(model_name=call.name, parameters=parameters)
            rpc = inference.RepositoryModelUnload(unload, metadata=metadata)
        elif call.operation == "v1_load":
            rpc = api.LoadModel(pb.LoadModelRequest(name=call.name), metadata=metadata)
        elif call.operation == "v1_unload":
            rpc = api.UnloadModel(pb.UnloadModelRequest(name=call.name), metadata=metadata)
        else:
            rpc = api.ReloadModel(pb.ReloadModelRequest(name=call.name), metadata=metadata)
        try:
            await rpc
        except grpc.aio.AioRpcError as exc:
            return GRPC_OUTCOME.get(exc.code(), exc.code().name)
        return "ok"

    async def both(self, call: Call) -> tuple[str, str]:
        """(REST outcome, gRPC outcome), each from the same state: the model loaded."""
        outcomes = []
        for wire in (self.rest, self.grpc):
            if MODEL not in self.engine.registry.ready_names():
                await self.engine.load(MODEL)
            outcomes.append(await wire(call))
        return outcomes[0], outcomes[1]


def _parameter(value: object) -> v2.ModelRepositoryParameter:
    if isinstance(value, bool):
        return v2.ModelRepositoryParameter(bool_param=value)
    if isinstance(value, int):
        return v2.ModelRepositoryParameter(int64_param=value)
    return v2.ModelRepositoryParameter(string_param=str(value))


@contextlib.asynccontextmanager
async def wires(repository: Path, **settings: Any) -> AsyncIterator[Wires]:
    options: dict[str, Any] = {
        "repository": repository,
        "device": "cpu",
        "cpu_threads": 1,
        "grpc_port": 0,
        "warmup": False,
        **settings,
    }
    config = Settings(**options)
    metrics = Metrics(CollectorRegistry())
    engine = Engine(config, metrics)
    server = create_grpc_server(engine, config, metrics)
    port = await server.start()
    await engine.start()
    app = create_app(engine, config, metrics)
    transport = httpx.ASGITransport(app=app)
    try:
        async with (
            httpx.AsyncClient(transport=transport, base_url="http://rest") as http,
            grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel,
        ):
            yield Wires(engine, http, channel)
    finally:
        await server.stop(0)
        await engine.drain(1.0)


@pytest.fixture
def repository(tmp_path: Path) -> Path:
    write_model(tmp_path, MODEL, input_type="features", input_size=2, hidden_size=8)
    return tmp_path


async def _disagreements(served: Wires, calls: list[Call]) -> list[str]:
    found = []
    for call in calls:
        rest, grpc_outcome = await served.both(call)
        if rest != grpc_outcome:
            found.append(f"{call}: REST {rest}, gRPC {grpc_outcome}")
    return found


async def test_authorization_is_decided_alike_on_both_wires(repository: Path) -> None:
    calls = [Call(op, tuple(auth)) for op in OPERATIONS for auth in AUTHORIZATIONS]
    async with wires(repository, management_enabled=True, management_token=TOKEN) as served:
        assert await _disagreements(served, calls) == []
        # The table means what it says: the right token in any case passes, nothing else does.
        assert await served.both(Call("index", (f"bearer {TOKEN}",))) == ("ok", "ok")
        assert await served.both(Call("index", ())) == ("unauthenticated",) * 2
        duplicate = Call("v1_reload", (f"Bearer {TOKEN}", f"Bearer {TOKEN}"))
        assert await served.both(duplicate) == ("unauthenticated",) * 2


@pytest.mark.parametrize(
    "settings",
    [{}, {"management_enabled": True}, {"management_token": TOKEN}],
    ids=["disabled", "enabled-without-token", "token-but-disabled"],
)
async def test_management_off_is_refused_alike(repository: Path, settings: dict[str, Any]) -> None:
    calls = [Call(op, tuple(auth)) for op in OPERATIONS for auth in ([], [f"Bearer {TOKEN}"])]
    async with wires(repository, **settings) as served:
        assert await _disagreements(served, calls) == []
        assert await served.both(Call("index", (f"Bearer {TOKEN}",))) == ("denied", "denied")


async def test_repository_parameters_and_names_are_checked_alike(repository: Path) -> None:
    auth = (f"Bearer {TOKEN}",)
    calls = [
        Call(op, auth, parameters=params)
        for op in ("v2_load", "v2_unload")
        for params in PARAMETERS
    ]
    calls += [
        Call(op, auth, name=name) for op in OPERATIONS[1:] for name in ("ghost", "a b", "x" * 201)
    ]
    async with wires(repository, management_enabled=True, management_token=TOKEN) as served:
        assert await _disagreements(served, calls) == []
        config = Call("v2_load", auth, parameters={"config": "{}"})
        assert await served.both(config) == ("invalid", "invalid")
        typed = Call("v2_load", auth, parameters={"unload_dependents": "yes"})
        assert await served.both(typed) == ("invalid", "invalid")
