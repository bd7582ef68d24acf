"""Management's rules, one set for both wires: who may call, and what the V2 repository
extension accepts.

The HTTP front-ends (service/http_api/app.py, service/http_api/v2_routes.py) and the gRPC ones
(service/grpc_api/server.py, service/grpc_api/v2_servicer.py) only collect what their wire carries
(every value of the `Authorization` header or `authorization` metadata; the repository parameters as
plain values) and call these functions, so both wires refuse the same calls with the same errors.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping, Sequence
from typing import Any

from service.core.errors import InvalidInput, PermissionDenied, Unauthenticated
from service.core.settings import Settings

# The V2 repository extension's load/unload parameters rnnserve takes. Triton's others carry
# model files or a config to load in place of the repository's: refused, since only the
# configured repository is ever read, by name.
REPOSITORY_PARAMETERS = {"unload_dependents": bool}
BEARER = "bearer"


def authorize(settings: Settings, authorization: Sequence[str]) -> None:
    """Allow a management call (load, unload, reload, and the whole V2 repository extension,
    its index included) only when management is enabled with a token and `authorization`, the
    call's every Authorization value, is exactly one `Bearer <token>` (the scheme in any case,
    RFC 7235) with that token; else PermissionDenied (off) or Unauthenticated."""
    if not settings.management_enabled:
        raise PermissionDenied(
            "management is disabled (--management-enabled, RNNSERVE_MANAGEMENT_ENABLED)"
        )
    token = settings.management_token
    if token is None:
        raise PermissionDenied(
            "management is enabled but no token is set (--management-token, "
            "RNNSERVE_MANAGEMENT_TOKEN)"
        )
    if len(authorization) != 1:
        given = "none" if not authorization else f"{len(authorization)}"
        raise Unauthenticated(
            "management calls need exactly one 'Authorization: Bearer <token>' header or "
            f"metadata entry, got {given}"
        )
    scheme, _, credentials = authorization[0].strip().partition(" ")
    if scheme.lower() != BEARER or not hmac.compare_digest(
        credentials.strip().encode(), token.get_secret_value().encode()
    ):
        raise Unauthenticated("management calls need 'Authorization: Bearer <token>'")


def check_repository_parameters(parameters: Any) -> None:
    """The parameters of a V2 repository load or unload: an object (absent or null: none) of
    known names with values of their type; InvalidInput("parameters…") otherwise."""
    if parameters is None:
        return
    if not isinstance(parameters, Mapping):
        raise InvalidInput("parameters", "expected an object")
    unknown = sorted(set(parameters) - set(REPOSITORY_PARAMETERS))
    if unknown:
        raise InvalidInput(
            "parameters",
            f"unsupported load/unload parameters {unknown}: models are loaded from the "
            f"repository by name (accepted: {sorted(REPOSITORY_PARAMETERS)})",
        )
    for name, kind in REPOSITORY_PARAMETERS.items():
        value = parameters.get(name)
        if value is not None and not isinstance(value, kind):
            raise InvalidInput(f"parameters.{name}", f"expected a {kind.__name__}")
