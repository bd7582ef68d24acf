"""The model label of front-end request metrics, shared by the REST and gRPC front-ends.

A failed request for a model the server does not know is recorded with empty model and version
labels, so that made-up names cannot grow the number of metric series.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from service.errors import ServiceError

if TYPE_CHECKING:
    from service.engine import Engine

Known = Callable[[str], bool]


def known_model(engine: Engine) -> Known:
    """A check whether the engine knows a model name."""

    def known(name: str) -> bool:
        try:
            engine.model_info(name)
        except ServiceError:
            return False
        return True

    return known


def request_labels(
    known: Known, model: str, version: int | None, error: BaseException | None
) -> tuple[str, int | None]:
    """(model, version) labels of one request: blank for a failed request on an unknown model."""
    if error is not None and model and not known(model):
        return "", None
    return model, version
