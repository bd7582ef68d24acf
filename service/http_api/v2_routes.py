"""The Open Inference Protocol (KServe V2) over HTTP, with Triton's binary tensor extension.

What requests mean (tensors, parameters, outputs, metadata, the repository) is
service/inference_protocol's, shared with V2 over gRPC; this module adds the HTTP body (JSON or a
JSON header and binary tensors, `binary_data_output` / `binary_data`). The body is read raw, so a
missing Content-Type is fine.
"""

from __future__ import annotations

from typing import Any

from fastapi import Request
from fastapi.responses import Response

from models.config import ModelConfig
from service.core import limits, management, validation
from service.core.engine import Engine
from service.core.errors import InvalidInput
from service.core.metrics import Metrics
from service.core.release import SERVER_NAME, server_version
from service.core.request_metrics import RequestMetrics
from service.core.settings import Settings
from service.core.types import EncodeRequest, GenerateRequest
from service.http_api import json_codecs, schemas
from service.http_api.bodies import json_response, management_guard, parse_body
from service.http_api.disconnects import unless_disconnected
from service.http_api.errors import as_core_error
from service.http_api.openapi import documented_body, errors_doc
from service.http_api.routing import Route, path_version
from service.inference_protocol import metadata, requests
from service.inference_protocol.tensors import V2Output

# NOTE: one tag per route (a router's tags add to a route's own): each route is listed once.
TAG = "open inference protocol (v2)"
REPOSITORY_TAG = "open inference protocol (v2): model repository"
EXTENSIONS = ["binary_tensor_data", "model_repository"]
# What the answer reads of a request's header (`infer_answer`).
ANSWER_FIELDS = ("id", "outputs", "parameters")

_META: dict[str, Any] = {
    "response_model": schemas.V2ModelMetadata,
    "responses": errors_doc(True, 404, 503),
    "tags": [TAG],
}
_READY: dict[str, Any] = {
    "response_model": schemas.V2ModelReady,
    "responses": {**errors_doc(True, 404), 503: {"model": schemas.V2ModelReady}},
    "tags": [TAG],
}
_INFER: dict[str, Any] = {
    "response_model": schemas.V2InferResponse,
    "responses": errors_doc(True, 400, 404, 413, 503, 504),
    "openapi_extra": documented_body(schemas.V2InferRequest, binary=True),
    "tags": [TAG],
}
_REPOSITORY: dict[str, Any] = {
    "tags": [REPOSITORY_TAG],
    "responses": errors_doc(True, 400, 401, 403, 404, 409, 503),
}
_INDEX: dict[str, Any] = {
    **_REPOSITORY,
    "response_model": list[schemas.V2RepositoryEntry],
    "openapi_extra": documented_body(schemas.V2RepositoryIndexBody),
}


class V2Routes:
    """The handlers of the V2 protocol over one engine (`routes()`: their table)."""

    def __init__(self, engine: Engine, settings: Settings, metrics: Metrics) -> None:
        self.engine = engine
        self.settings = settings
        self.requests = RequestMetrics(metrics, "v2-rest", engine.knows, as_core_error)

    def routes(self) -> list[Route]:
        """The table. Repository paths take `{name:path}`, so that a name carrying an (encoded)
        '/' reaches the name check and is refused as a bad name (400)."""
        return [
            Route("GET", "/v2/health/live", self.server_live, "server_live",
                  '200 `{"live": true}` while the process answers.',
                  {"response_model": schemas.V2ServerLive, "tags": [TAG],
                   "responses": {503: {"model": schemas.V2ServerLive}}}),
            Route("GET", "/v2/health/ready", self.server_ready, "server_ready",
                  '200 `{"ready": true}` when the server is ready for inference (the rule of '
                  "/readyz).",
                  {"response_model": schemas.V2ServerReady, "tags": [TAG],
                   "responses": {503: {"model": schemas.V2ServerReady}}}),
            Route("GET", "/v2", self.server_metadata, "server_metadata",
                  "Server name, version and protocol extensions.",
                  {"response_model": schemas.V2ServerMetadata, "tags": [TAG]}),
            Route("GET", "/v2/models/{name}", self.model_metadata, "model_meta",
                  "Inputs and outputs of the model's serving version.", _META),
            Route("GET", "/v2/models/{name}/versions/{version}", self.model_metadata,
                  "model_version_meta", "Inputs and outputs of one version.", _META),
            Route("GET", "/v2/models/{name}/ready", self.model_ready, "model_ready",
                  "200 when a version of the model is READY, 503 otherwise.", _READY),
            Route("GET", "/v2/models/{name}/versions/{version}/ready", self.model_ready,
                  "model_version_ready", "200 when this version is READY, 503 otherwise.",
                  _READY),
            Route("POST", "/v2/models/{name}/infer", self.infer, "infer_latest",
                  "Run inference on the model's serving version (JSON or binary tensors).",
                  _INFER, direct=True),
            Route("POST", "/v2/models/{name}/versions/{version}/infer", self.infer,
                  "infer_version", "Run inference on one version.", _INFER, direct=True),
            Route("POST", "/v2/repository/index", self.repository_index, "repository_index",
                  "Every model version known to the server, with its state.", _INDEX),
            Route("POST", "/v2/repository/models/{name:path}/load", self.repository_load,
                  "repository_load", "Load (or reload) a model from the repository by name.",
                  _REPOSITORY),
            Route("POST", "/v2/repository/models/{name:path}/unload", self.repository_unload,
                  "repository_unload", "Unload every version of a model.", _REPOSITORY),
        ]  # fmt: skip

    # -- health and metadata -------------------------------------------------------------------
    # NOTE: the status is the answer (Triton's clients read only it); the body says it again
    # for clients that read it, as KServe's servers answer and its SDK expects.

    async def server_live(self, request: Request) -> Response:
        """200 while the process answers."""
        live = self.engine.live
        return json_response({"live": live}, 200 if live else 503)

    async def server_ready(self, request: Request) -> Response:
        """200 when the server is ready for inference."""
        ready = self.engine.ready
        return json_response({"ready": ready}, 200 if ready else 503)

    async def server_metadata(self, request: Request) -> Response:
        """Server name, version and protocol extensions."""
        return json_response(
            {"name": SERVER_NAME, "version": server_version(), "extensions": EXTENSIONS}
        )

    async def model_metadata(
        self, request: Request, name: str, version: str | None = None
    ) -> Response:
        """A version's inputs, outputs and the dtype each part computes in."""
        with self.requests.observe(name, None, "model_metadata") as observed:
            observed.version = path_version(version)
            resolved, config = self.engine.model_config(name, observed.version)
            observed.version = resolved
            answer = {
                "name": name,
                "versions": metadata.ready_versions(self.engine, name) or [str(resolved)],
                "platform": SERVER_NAME,
                "inputs": _tensors_json(metadata.input_metadata(config)),
                "outputs": _tensors_json(metadata.output_metadata(config)),
                "parameters": metadata.precision_parameters(self.engine, name, resolved),
            }
            return json_response(answer)

    async def model_ready(
        self, request: Request, name: str, version: str | None = None
    ) -> Response:
        """200 when the model (or that version) takes inference, 503 otherwise."""
        with self.requests.observe(name, None, "model_ready") as observed:
            number = observed.version = path_version(version)
            ready = metadata.model_ready(self.engine, name, number)
            return json_response({"name": name, "ready": ready}, 200 if ready else 503)

    # -- inference -----------------------------------------------------------------------------

    async def infer(self, request: Request, name: str, version: str | None = None) -> Response:
        """Run one infer request (JSON body, or a JSON header and binary tensors)."""
        with self.requests.observe(name, None, "infer") as observed:
            number = observed.version = path_version(version)
            # NOTE: the model first: an unknown model's body is never read, and tensors larger
            # than the model takes are refused before their data is decoded.
            resolved, config = self.engine.infer_config(name, number)
            observed.version = resolved
            core, answer = self._infer_request(
                name,
                resolved,
                config,
                await request.body(),
                request.headers.get(json_codecs.HEADER_LENGTH),
            )
            _, outputs = await unless_disconnected(
                request, requests.infer(self.engine, core, config)
            )
            return infer_answer(answer, name, resolved, outputs)

    def _infer_request(
        self,
        name: str,
        version: int,
        config: ModelConfig,
        body: bytes,
        header_length: str | None,
    ) -> tuple[EncodeRequest | GenerateRequest, dict[str, Any]]:
        """The engine's request of an infer body, and what its answer needs of the header.

        The parsed header lives only here: what is awaited holds numpy arrays and scalars, no
        JSON lists (thousands per request) for the garbage collector to walk.
        """
        header, tail = json_codecs.split_v2_body(
            body, header_length, self.settings.request_values_limit
        )
        tensors = json_codecs.decode_v2_inputs(header, tail)
        bytes_per_number = (
            limits.BINARY_BYTES_PER_NUMBER
            if binary_encoding(header)
            else limits.JSON_BYTES_PER_NUMBER
        )
        core = requests.infer_request(
            name,
            version,
            config,
            tensors,
            json_codecs.parameters_of(header),
            limit=self.settings.max_sequences_per_request,
            answer_limit=limits.answer_limit(self.settings, bytes_per_number, padded=True),
        )
        return core, {key: header[key] for key in ANSWER_FIELDS if key in header}

    # -- the model repository ------------------------------------------------------------------

    async def repository_index(self, request: Request) -> Response:
        """Every model version known to the server (the READY ones with `ready: true`)."""
        with self.requests.observe("", None, "repository_index"):
            management_guard(self.settings, request)
            body = await request.body()
            query = (
                parse_body(schemas.V2RepositoryIndexBody, body, self.settings.request_values_limit)
                if body.strip()
                else None
            )
            ready_only = query is not None and query.ready is True
            entries = []
            for model, v in metadata.repository_index(self.engine, ready_only):
                entry: dict[str, Any] = {"name": model, "version": str(v.version), "state": v.state}
                if v.reason:
                    entry["reason"] = v.reason
                entries.append(entry)
            return json_response(entries)

    async def repository_load(self, request: Request, name: str) -> Response:
        """Load a model by name (reload it when it has a READY version)."""
        return await self._repository_action(request, "load", name)

    async def repository_unload(self, request: Request, name: str) -> Response:
        """Unload every version of a model."""
        return await self._repository_action(request, "unload", name)

    async def _repository_action(self, request: Request, action: str, name: str) -> Response:
        with self.requests.observe(name, None, f"repository_{action}"):
            management_guard(self.settings, request)
            validation.check_model_name(name)
            body = await request.body()
            value = (
                json_codecs.loads(body, max_values=self.settings.request_values_limit)
                if body.strip()
                else {}
            )
            if not isinstance(value, dict):
                raise InvalidInput("body", "expected a JSON object")
            management.check_repository_parameters(value.get("parameters"))
            if action == "unload":
                await self.engine.unload(name)
            else:
                await metadata.repository_load(self.engine, name)
        return Response(status_code=200)


def _tensors_json(tensors: list[metadata.TensorMetadata]) -> list[dict[str, Any]]:
    return [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in tensors]


def select_outputs(
    header: dict[str, Any], outputs: list[V2Output]
) -> tuple[list[V2Output], set[str]]:
    """Keep the requested outputs (all when none are named) and find which go binary."""
    params = json_codecs.parameters_of(header)
    if not isinstance(params, dict):
        raise InvalidInput("parameters", "expected an object")
    all_binary = requests.parameter(params, "binary_data_output", (bool,), False)
    requested = header.get("outputs")
    if requested is None:
        return outputs, ({o.name for o in outputs} if all_binary else set())
    if not isinstance(requested, list):
        raise InvalidInput("outputs", "expected a list of {name, parameters}")
    names: list[str | None] = []
    binary: set[str] = set()
    for k, spec in enumerate(requested):
        name = spec.get("name") if isinstance(spec, dict) else None
        names.append(name if isinstance(name, str) else None)
        spec_params = json_codecs.parameters_of(spec) if isinstance(spec, dict) else {}
        if not isinstance(spec_params, dict):
            raise InvalidInput(f"outputs[{k}].parameters", "expected an object")
        if isinstance(name, str) and requests.parameter(
            spec_params, "binary_data", (bool,), all_binary
        ):
            binary.add(name)
    return requests.requested_outputs(outputs, names), binary


def binary_encoding(header: dict[str, Any]) -> bool:
    """Whether the answer to `header` sends ENCODING as a binary tensor (4 bytes a number) rather
    than JSON (counted at 16): its own `binary_data`, else the request's `binary_data_output`."""
    params = json_codecs.parameters_of(header)
    binary = isinstance(params, dict) and params.get("binary_data_output") is True
    requested = header.get("outputs")
    for spec in requested if isinstance(requested, list) else []:
        if isinstance(spec, dict) and spec.get("name") == "ENCODING":
            spec_params = json_codecs.parameters_of(spec)
            if isinstance(spec_params, dict) and isinstance(spec_params.get("binary_data"), bool):
                return bool(spec_params["binary_data"])
    return binary


def infer_answer(
    header: dict[str, Any], name: str, version: int, outputs: list[V2Output]
) -> Response:
    """The answer of an infer: the outputs the request asked for, JSON or binary."""
    chosen, binary = select_outputs(header, outputs)
    answer: dict[str, Any] = {"model_name": name, "model_version": str(version)}
    if isinstance(header.get("id"), str):
        answer["id"] = header["id"]
    body, header_length = json_codecs.encode_v2_response(answer, chosen, binary)
    if header_length is None:
        return Response(body, media_type="application/json")
    return Response(
        body,
        media_type="application/octet-stream",
        headers={json_codecs.HEADER_LENGTH: str(header_length)},
    )
