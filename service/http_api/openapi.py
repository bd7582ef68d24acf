"""The OpenAPI document: entries for the request bodies routes read raw, the error statuses of
each route, and the document's own fixes (400, not FastAPI's 422, for a bad request)."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from service.http_api import schemas

# Request bodies read raw (fast path) but documented from these models.
REQUEST_MODELS: tuple[type[BaseModel], ...] = (
    schemas.EncodeBody,
    schemas.GenerateBody,
    schemas.V2InferRequest,
    schemas.V2RepositoryIndexBody,
    schemas.SessionBody,
    schemas.ChunkBody,
    schemas.StreamBody,
)


def documented_body(model: type[BaseModel], binary: bool = False) -> dict[str, Any]:
    """`openapi_extra` describing a request body that the route reads raw."""
    schema = {"$ref": f"#/components/schemas/{model.__name__}"}
    content: dict[str, Any] = {"application/json": {"schema": schema}}
    if binary:
        content["application/octet-stream"] = {
            "schema": {"type": "string", "format": "binary"},
            "description": "JSON header of Inference-Header-Content-Length bytes, then tensors.",
        }
    return {"requestBody": {"required": True, "content": content}}


def errors_doc(v2: bool, *statuses: int) -> dict[int | str, dict[str, Any]]:
    """The `responses` entries for error statuses of a route."""
    model = schemas.V2ErrorBody if v2 else schemas.ErrorBody
    return {status: {"model": model} for status in statuses}


def optional_body(model: type[BaseModel]) -> dict[str, Any]:
    """`documented_body` for a body that may be left out."""
    extra = documented_body(model)
    extra["requestBody"]["required"] = False
    return extra


def install_openapi(app: FastAPI) -> None:
    """OpenAPI with the raw-read request bodies' models and 400 (not 422) for bad requests."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = get_openapi(
            title=app.title, version=app.version, description=app.description, routes=app.routes
        )
        _, defs = models_json_schema(
            [(m, "validation") for m in REQUEST_MODELS],
            ref_template="#/components/schemas/{model}",
        )
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        components.update(defs.get("$defs", {}))
        for path in schema.get("paths", {}).values():
            for operation in path.values():
                responses = operation.get("responses", {})
                if "422" in responses:
                    responses.pop("422")
                    responses.setdefault(
                        "400",
                        {
                            "description": "Invalid request",
                            "content": {
                                "application/json": {
                                    "schema": {"$ref": "#/components/schemas/ErrorBody"}
                                }
                            },
                        },
                    )
        components.pop("HTTPValidationError", None)
        components.pop("ValidationError", None)
        components.setdefault(
            "ErrorBody",
            schemas.ErrorBody.model_json_schema(ref_template="#/components/schemas/{model}"),
        )
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
