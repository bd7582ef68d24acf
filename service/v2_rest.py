"""The Open Inference Protocol (KServe V2) over REST, with Triton's binary tensor data extension.

Tensor names and their checks (DESIGN §3) and request parameters (`pooling`, `max_length`,
`beam_size`, `timeout_ms`) are decided in service/v2_common.py, shared with the gRPC front-end;
this module adds `binary_data_output` / `binary_data`. The body is read raw, so a missing
Content-Type is fine.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from models.config import ModelConfig
from service import (
    codecs,
    http_common,
    management,
    metric_labels,
    rest_schemas,
    v2_common,
    validation,
)
from service.engine import Engine
from service.errors import InvalidInput
from service.metrics import Metrics
from service.settings import Settings
from service.types import AnswerLimit
from service.types import Protocol as WireProtocol

PROTOCOL: WireProtocol = "v2-rest"
# NOTE: one tag per route (a router's tags add to a route's own): each route is listed once.
TAG = "open inference protocol (v2)"
REPOSITORY_TAG = "open inference protocol (v2): model repository"
EXTENSIONS = ["binary_tensor_data", "model_repository"]


def _tensors_json(tensors: list[v2_common.TensorMetadata]) -> list[dict[str, Any]]:
    return [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in tensors]


def model_metadata(
    name: str, versions: list[str], config: ModelConfig, parameters: dict[str, str]
) -> dict[str, Any]:
    """The V2 model metadata object (`parameters`: `v2_common.precision_parameters`)."""
    return {
        "name": name,
        "versions": versions,
        "platform": v2_common.SERVER_NAME,
        "inputs": _tensors_json(v2_common.input_metadata(config)),
        "outputs": _tensors_json(v2_common.output_metadata(config)),
        "parameters": parameters,
    }


def select_outputs(
    header: dict[str, Any], outputs: list[codecs.V2Output]
) -> tuple[list[codecs.V2Output], set[str]]:
    """Keep the requested outputs (all when none are named) and find which go binary."""
    params = codecs.parameters_of(header)
    if not isinstance(params, dict):
        raise InvalidInput("parameters", "expected an object")
    all_binary = v2_common.parameter(params, "binary_data_output", (bool,), False)
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
        spec_params = codecs.parameters_of(spec) if isinstance(spec, dict) else {}
        if not isinstance(spec_params, dict):
            raise InvalidInput(f"outputs[{k}].parameters", "expected an object")
        if isinstance(name, str) and v2_common.parameter(
            spec_params, "binary_data", (bool,), all_binary
        ):
            binary.add(name)
    return v2_common.requested_outputs(outputs, names), binary


def binary_encoding(header: dict[str, Any]) -> bool:
    """Whether the answer to `header` sends ENCODING as a binary tensor (4 bytes a number) rather
    than JSON (counted at 16): its own `binary_data`, else the request's `binary_data_output`."""
    params = codecs.parameters_of(header)
    binary = isinstance(params, dict) and params.get("binary_data_output") is True
    requested = header.get("outputs")
    for spec in requested if isinstance(requested, list) else []:
        if isinstance(spec, dict) and spec.get("name") == "ENCODING":
            spec_params = codecs.parameters_of(spec)
            if isinstance(spec_params, dict) and isinstance(spec_params.get("binary_data"), bool):
                return bool(spec_params["binary_data"])
    return binary


def create_router(engine: Engine, settings: Settings, metrics: Metrics) -> APIRouter:
    """The V2 REST routes: health, metadata, infer, and the model repository extension."""
    router = APIRouter()
    observer = http_common.RequestObserver(metrics, PROTOCOL, metric_labels.known_model(engine))
    bad = http_common.errors_doc(True, 400, 404, 413, 503, 504)

    # NOTE: the status is the answer (Triton's clients read only it); the body says it again
    # for clients that read it, as KServe's servers answer and its SDK expects.
    @router.get(
        "/v2/health/live",
        response_model=rest_schemas.V2ServerLive,
        responses={503: {"model": rest_schemas.V2ServerLive}},
        tags=[TAG],
    )
    async def server_live() -> Response:
        """200 `{"live": true}` while the process answers."""
        live = engine.live
        return http_common.json_response({"live": live}, 200 if live else 503)

    @router.get(
        "/v2/health/ready",
        response_model=rest_schemas.V2ServerReady,
        responses={503: {"model": rest_schemas.V2ServerReady}},
        tags=[TAG],
    )
    async def server_ready() -> Response:
        """200 `{"ready": true}` when the server is ready for inference (the rule of /readyz)."""
        ready = engine.ready
        return http_common.json_response({"ready": ready}, 200 if ready else 503)

    @router.get("/v2", response_model=rest_schemas.V2ServerMetadata, tags=[TAG])
    async def server_metadata() -> Response:
        """Server name, version and protocol extensions."""
        return http_common.json_response(
            {
                "name": v2_common.SERVER_NAME,
                "version": v2_common.server_version(),
                "extensions": EXTENSIONS,
            }
        )

    def metadata(name: str, version: int | None) -> Response:
        with observer.observe(name, version, "model_metadata") as labels:
            resolved, config = engine.model_config(name, version)
            labels["version"] = resolved
            versions = v2_common.ready_versions(engine, name) or [str(resolved)]
            parameters = v2_common.precision_parameters(engine, name, resolved)
            return http_common.json_response(model_metadata(name, versions, config, parameters))

    def ready(name: str, version: int | None) -> Response:
        with observer.observe(name, version, "model_ready"):
            ready = v2_common.model_ready(engine, name, version)
            return http_common.json_response({"name": name, "ready": ready}, 200 if ready else 503)

    meta_doc: dict[str, Any] = {
        "response_model": rest_schemas.V2ModelMetadata,
        "responses": http_common.errors_doc(True, 404, 503),
        "tags": [TAG],
    }
    ready_doc: dict[str, Any] = {
        "response_model": rest_schemas.V2ModelReady,
        "responses": {
            **http_common.errors_doc(True, 404),
            503: {"model": rest_schemas.V2ModelReady},
        },
        "tags": [TAG],
    }

    @router.get("/v2/models/{name}", **meta_doc)
    async def model_meta(name: str) -> Response:
        """Inputs and outputs of the model's serving version."""
        return metadata(name, None)

    @router.get("/v2/models/{name}/versions/{version}", **meta_doc)
    @observer.route("model_metadata")
    async def model_version_meta(name: str, version: http_common.VersionPath) -> Response:
        """Inputs and outputs of one version."""
        return metadata(name, version)

    @router.get("/v2/models/{name}/ready", **ready_doc)
    async def model_ready(name: str) -> Response:
        """200 when a version of the model is READY, 503 otherwise."""
        return ready(name, None)

    @router.get("/v2/models/{name}/versions/{version}/ready", **ready_doc)
    @observer.route("model_ready")
    async def model_version_ready(name: str, version: http_common.VersionPath) -> Response:
        """200 when this version is READY, 503 otherwise."""
        return ready(name, version)

    async def infer(name: str, version: int | None, request: Request) -> Response:
        with observer.observe(name, version, "infer") as labels:
            # NOTE: the model first: an unknown model's body is never read, and tensors larger
            # than the model takes are refused before their data is decoded.
            resolved, config = engine.infer_config(name, version)
            labels["version"] = resolved
            header, tail = codecs.split_v2_body(
                await request.body(),
                request.headers.get(codecs.HEADER_LENGTH),
                settings.request_values_limit,
            )
            tensors = codecs.decode_v2_inputs(header, tail)
            kind, sequences = v2_common.infer_sequences(
                tensors, config, settings.max_sequences_per_request
            )
            params = codecs.parameters_of(header)
            if not isinstance(params, dict):
                raise InvalidInput("parameters", "expected an object")
            answers = AnswerLimit(
                settings.max_answer_bytes,
                4 if binary_encoding(header) else 16,
                True,
                "--max-answer-bytes",
            )
            infer = v2_common.infer_request(
                name, resolved, config, kind, sequences, params, PROTOCOL, answer_limit=answers
            )
            _, outputs = await http_common.unless_disconnected(
                request, v2_common.infer(engine, infer, config)
            )
            chosen, binary = select_outputs(header, outputs)
            answer: dict[str, Any] = {"model_name": name, "model_version": str(resolved)}
            if isinstance(header.get("id"), str):
                answer["id"] = header["id"]
            body, header_length = codecs.encode_v2_response(answer, chosen, binary)
            if header_length is None:
                return Response(body, media_type="application/json")
            return Response(
                body,
                media_type="application/octet-stream",
                headers={codecs.HEADER_LENGTH: str(header_length)},
            )

    infer_doc: dict[str, Any] = {
        "response_model": rest_schemas.V2InferResponse,
        "responses": bad,
        "openapi_extra": http_common.documented_body(rest_schemas.V2InferRequest, binary=True),
        "tags": [TAG],
    }

    @router.post("/v2/models/{name}/infer", **infer_doc)
    async def infer_latest(name: str, request: Request) -> Response:
        """Run inference on the model's serving version (JSON or binary tensors)."""
        return await infer(name, None, request)

    @router.post("/v2/models/{name}/versions/{version}/infer", **infer_doc)
    @observer.route("infer")
    async def infer_version(
        name: str, version: http_common.VersionPath, request: Request
    ) -> Response:
        """Run inference on one version."""
        return await infer(name, version, request)

    repo_doc: dict[str, Any] = {
        "tags": [REPOSITORY_TAG],
        "responses": http_common.errors_doc(True, 400, 401, 403, 404, 409, 503),
    }

    @router.post(
        "/v2/repository/index",
        response_model=list[rest_schemas.V2RepositoryEntry],
        openapi_extra=http_common.documented_body(rest_schemas.V2RepositoryIndexBody),
        **repo_doc,
    )
    async def repository_index(request: Request) -> Response:
        """Every model version known to the server, with its state."""
        with observer.observe("", None, "repository_index"):
            http_common.management_guard(settings, request)
            body = await request.body()
            query = (
                http_common.parse_body(
                    rest_schemas.V2RepositoryIndexBody, body, settings.request_values_limit
                )
                if body.strip()
                else None
            )
            ready_only = query is not None and query.ready is True
            entries = []
            for model, v in v2_common.repository_index(engine, ready_only):
                entry: dict[str, Any] = {
                    "name": model,
                    "version": str(v.version),
                    "state": v.state,
                }
                if v.reason:
                    entry["reason"] = v.reason
                entries.append(entry)
            return http_common.json_response(entries)

    async def repository_action(action: str, name: str, request: Request) -> Response:
        with observer.observe(name, None, f"repository_{action}"):
            http_common.management_guard(settings, request)
            validation.check_model_name(name)
            body = await request.body()
            value = (
                codecs.loads(body, max_values=settings.request_values_limit) if body.strip() else {}
            )
            if not isinstance(value, dict):
                raise InvalidInput("body", "expected a JSON object")
            management.check_repository_parameters(value.get("parameters"))
            if action == "unload":
                await engine.unload(name)
            else:
                await v2_common.repository_load(engine, name)
        return Response(status_code=200)

    # NOTE: `:path`, so that a name carrying an (encoded) '/' reaches the name check and is
    # refused as a bad name (400), instead of missing the route.
    @router.post("/v2/repository/models/{name:path}/load", **repo_doc)
    async def repository_load(name: str, request: Request) -> Response:
        """Load (or reload) a model from the repository by name."""
        return await repository_action("load", name, request)

    @router.post("/v2/repository/models/{name:path}/unload", **repo_doc)
    async def repository_unload(name: str, request: Request) -> Response:
        """Unload every version of a model."""
        return await repository_action("unload", name, request)

    return router
