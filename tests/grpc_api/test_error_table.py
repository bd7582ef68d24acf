"""The gRPC error table covers every core error class, each with a deliberate code."""

from __future__ import annotations

import grpc
import pytest

from service.core import errors
from service.grpc_api.errors import GRPC_STATUS, grpc_status


@pytest.mark.parametrize("cls", errors.ALL_ERRORS, ids=lambda c: c.__name__)
def test_every_core_error_has_a_grpc_code(cls: type[errors.ServiceError]) -> None:
    assert cls in GRPC_STATUS
    assert GRPC_STATUS[cls] not in (grpc.StatusCode.OK, grpc.StatusCode.UNKNOWN)


def test_every_known_subclass_resolves_through_the_table() -> None:
    def subclasses(cls: type) -> set[type]:
        direct = set(cls.__subclasses__())
        return direct.union(*(subclasses(c) for c in direct))

    for cls in subclasses(errors.ServiceError):
        assert any(base in GRPC_STATUS for base in cls.__mro__), cls


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (errors.NotFound("model 'x' not found"), grpc.StatusCode.NOT_FOUND),
        (errors.InvalidInput("inputs[0]", "longer than 2048"), grpc.StatusCode.INVALID_ARGUMENT),
        (errors.NotReady("loading"), grpc.StatusCode.UNAVAILABLE),
        (errors.Overloaded("queue full", 2.0), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (errors.DeadlineExceeded("late"), grpc.StatusCode.DEADLINE_EXCEEDED),
        (errors.Draining("shutting down"), grpc.StatusCode.UNAVAILABLE),
        (errors.Unauthenticated("token"), grpc.StatusCode.UNAUTHENTICATED),
        (errors.PermissionDenied("off"), grpc.StatusCode.PERMISSION_DENIED),
        (errors.Conflict("busy"), grpc.StatusCode.FAILED_PRECONDITION),
        (errors.ComputeError("boom"), grpc.StatusCode.INTERNAL),
    ],
)
def test_status_and_message(error: errors.ServiceError, code: grpc.StatusCode) -> None:
    assert grpc_status(error) == (code, error.message)


def test_invalid_input_message_names_the_field() -> None:
    code, message = grpc_status(errors.InvalidInput("tokens[0][17]", "id 9000 >= vocab_size 5000"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert message.startswith("tokens[0][17]: ") and "5000" in message


def test_subclass_uses_its_parents_code() -> None:
    class QueueFull(errors.Overloaded):
        pass

    assert grpc_status(QueueFull("full"))[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
