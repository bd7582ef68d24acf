"""The model and version labels of front-end request metrics, shared by the REST and gRPC
front-ends.

A failed request for a model the server does not know is recorded with empty model and version
labels, and one for a version the model does not have with an empty version label, so that
made-up names and numbers cannot grow the number of metric series.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from service.errors import ServiceError

if TYPE_CHECKING:
    from service.engine import Engine

# known(model, version): the server knows the model (and that version of it, unless None).
Known = Callable[[str, int | None], bool]


def known_model(engine: Engine) -> Known:
    """A check whether the engine knows a model name (and one of its versions)."""

    def known(name: str, version: int | None) -> bool:
        try:
            engine.model_info(name, version)
        except ServiceError:
            return False
        return True

    return known


def request_labels(
    known: Known, model: str, version: int | None, error: BaseException | None
) -> tuple[str, int | None]:
    """(model, version) labels of one request: for a failed request, blank unless known."""
    if error is None or not model:
        return model, version
    if not known(model, None):
        return "", None
    if version is not None and not known(model, version):
        return model, None
    return model, version
