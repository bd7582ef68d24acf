"""Request and answer bodies of the HTTP front-end: JSON bodies read raw and checked against
their pydantic models (so that the big arrays skip pydantic; service/http_api/json_codecs.py
turns them into numpy), JSON answers written by orjson, server-sent events, and the management
rule applied to the request's headers."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import Response
from pydantic import BaseModel, ValidationError

from service.core import management
from service.core.errors import InvalidInput
from service.core.settings import Settings
from service.http_api import json_codecs
from service.http_api.errors import validation_error

_B = TypeVar("_B", bound=BaseModel)


def json_response(value: Any, status: int = 200) -> Response:
    """A JSON answer serialised by orjson (numpy arrays included)."""
    return Response(json_codecs.dumps(value), status_code=status, media_type="application/json")


def present(**fields: Any) -> dict[str, Any]:
    """A JSON object of the fields that are not None (answers leave absent parts out)."""
    return {name: value for name, value in fields.items() if value is not None}


def fields_of(result: object, *names: str) -> dict[str, Any]:
    """A JSON object of the attributes `names` of `result` that are not None, in that order."""
    return present(**{name: getattr(result, name) for name in names})


def parse_body(model: type[_B], body: bytes, max_values: int | None = None) -> _B:
    """Parse and check a JSON body against `model`; problems become InvalidInput naming fields,
    a body of more than `max_values` JSON values PayloadTooLarge (before parsing)."""
    value = json_codecs.loads(body, max_values=max_values) if body else {}
    if not isinstance(value, dict):
        raise InvalidInput("body", "expected a JSON object")
    try:
        return model.model_validate(value)
    except ValidationError as exc:
        raise validation_error(exc) from None


def read_body(
    model: type[BaseModel],
    body: bytes,
    max_values: int | None,
    plain: Callable[[dict[str, Any]], bool],
) -> dict[str, Any]:
    """A JSON body of `model` as its fields (each field present, absent ones at their defaults).

    A body that `plain` finds valid as it stands skips pydantic; any other is checked by `model`,
    so problems are named exactly as `parse_body` names them.
    """
    value = json_codecs.loads(body, max_values=max_values) if body else {}
    if not isinstance(value, dict):
        raise InvalidInput("body", "expected a JSON object")
    if plain(value):
        return {**_defaults(model), **value}
    try:
        checked = model.model_validate(value)
    except ValidationError as exc:
        raise validation_error(exc) from None
    return {name: getattr(checked, name) for name in type(checked).model_fields}


_DEFAULTS: dict[type[BaseModel], dict[str, Any]] = {}


def _defaults(model: type[BaseModel]) -> dict[str, Any]:
    defaults = _DEFAULTS.get(model)
    if defaults is None:
        defaults = _DEFAULTS[model] = {
            name: field.get_default(call_default_factory=True)
            for name, field in model.model_fields.items()
        }
    return defaults


def management_guard(settings: Settings, request: Request) -> None:
    """Allow a management call by the one rule of both wires (`management.authorize`)."""
    management.authorize(settings, request.headers.getlist("authorization"))


def sse(event: str, data: Any) -> bytes:
    """One server-sent event."""
    return b"event: " + event.encode() + b"\ndata: " + json_codecs.dumps(data) + b"\n\n"
