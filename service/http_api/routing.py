"""Route tables: each HTTP route is a row (`Route`: method, path, handler, OpenAPI entry), and
the same rows build the FastAPI routes (`api_router`) and the direct dispatcher's matchers
(`DirectRoute`, service/http_api/direct_dispatch.py).

A handler takes the request and the path's parameters as text, `handler(request, name=...,
version=...)`; a `{version}` is read by the handler (`path_version`), inside its observed
block, so that a refused version is counted under the route's endpoint like any refusal.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import WithJsonSchema

from service.core import validation

Handler = Callable[..., Awaitable[Response]]

# `{name}` or `{name:path}` in a route's path.
_PARAMETER = re.compile(r"{(\w+)(?::path)?}")
# What the OpenAPI document says of a `{version}`: an integer (the handler reads the text).
_VERSION_TEXT = Annotated[str, WithJsonSchema({"type": "integer"})]
# A version the direct dispatcher takes: 1–9 digits, not all zeros; anything else goes down
# FastAPI's stack, to the same handler (which refuses it).
_DIRECT_VERSION = "(?P<version>(?=[0-9]*[1-9])[0-9]{1,9})"


@dataclass(frozen=True, slots=True)
class Route:
    """One HTTP route: `handler` answers `method` `path`; `name` and `description` are its
    OpenAPI operation's (operationId, default summary), `doc` the rest of its OpenAPI entry
    (FastAPI's `add_api_route` options); `direct` routes skip FastAPI's stack."""

    method: str
    path: str
    handler: Handler
    name: str
    description: str = ""
    doc: Mapping[str, Any] = field(default_factory=dict)
    direct: bool = False

    @property
    def parameters(self) -> list[str]:
        """The names of the path's parameters, in order."""
        return _PARAMETER.findall(self.path)


def path_version(text: str | None) -> int | None:
    """A `{version}` path parameter (None: the route has none) as the engine's version: 1–19
    digits 0-9, at least 1; `InvalidInput("path.version")` else."""
    return None if text is None else validation.parse_version(text, "path.version")


def api_router(routes: Iterable[Route]) -> APIRouter:
    """The FastAPI routes of `routes`, in their order (it decides which path matches first)."""
    router = APIRouter()
    for route in routes:
        router.add_api_route(
            route.path,
            _endpoint(route),
            methods=[route.method],
            name=route.name,
            description=route.description,
            **route.doc,
        )
    return router


def _endpoint(route: Route) -> Handler:
    """A FastAPI endpoint that calls `route.handler`; FastAPI reads its parameters (the request
    and the path's, as text) from the signature made here."""
    handler = route.handler

    async def endpoint(request: Request, **params: str) -> Response:
        return await handler(request, **params)

    parameters = [inspect.Parameter("request", inspect.Parameter.KEYWORD_ONLY, annotation=Request)]
    parameters += [
        inspect.Parameter(
            name,
            inspect.Parameter.KEYWORD_ONLY,
            annotation=_VERSION_TEXT if name == "version" else str,
        )
        for name in route.parameters
    ]
    endpoint.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
    endpoint.__name__ = route.name
    return endpoint


@dataclass(frozen=True, slots=True)
class DirectRoute:
    """A route's own matcher for the direct dispatcher: exactly its path, `{name}` one segment,
    `{version}` as `_DIRECT_VERSION`."""

    method: str
    pattern: re.Pattern[str]
    handler: Handler

    @classmethod
    def of(cls, route: Route) -> DirectRoute:
        regex = ""
        for literal, name in zip(
            _PARAMETER.split(route.path)[::2],
            [*route.parameters, None],
            strict=True,
        ):
            regex += re.escape(literal)
            if name == "version":
                regex += _DIRECT_VERSION
            elif name is not None:
                regex += f"(?P<{name}>[^/]+)"
        return cls(route.method, re.compile(regex), route.handler)
