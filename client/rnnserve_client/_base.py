"""What `Client` and `AsyncClient` share besides their I/O: the constructor (addresses,
deadline, attempts, headers), the transports (one per address, made on first use), each call's
retry plan, a session's fields, and the making of their methods from `_calls.py`.
"""

from __future__ import annotations

import inspect
import threading
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Generic, TypeVar

from rnnserve_client._inputs import Chunk, chunk_of
from rnnserve_client._retry import Address, Plan, Rotation, parse_addresses
from rnnserve_client.results import ChunkResult, SessionOpened

DEFAULT_TIMEOUT_S = 60.0
DEFAULT_MAX_ATTEMPTS = 10

TransportT = TypeVar("TransportT")
F = TypeVar("F", bound=Callable[..., Any])


class ClientBase(Generic[TransportT]):
    """A client's addresses and settings, and its transport to each address."""

    def __init__(
        self,
        url: str | Sequence[str],
        *,
        timeout: float | None = DEFAULT_TIMEOUT_S,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        headers: Mapping[str, str] | None = None,
        grpc_load_balancing: str | None = None,
    ) -> None:
        addresses = parse_addresses(url if isinstance(url, str) else tuple(url))
        if max_attempts < 1:
            raise ValueError("max_attempts is at least 1")
        self.timeout = timeout
        self.max_attempts = max_attempts
        self.addresses = addresses
        self._headers = dict(headers or {})
        self._load_balancing = grpc_load_balancing
        self._rotation = Rotation(len(addresses))
        self._transports: list[TransportT | None] = [None] * len(addresses)
        self._lock = threading.Lock()

    def _connect(self, address: Address) -> TransportT:
        """A transport to `address` (REST or gRPC, by its scheme)."""
        raise NotImplementedError

    def _transport(self, index: int) -> TransportT:
        # Made on first use: an asyncio transport must be made inside the running loop.
        with self._lock:
            transport = self._transports[index]
            if transport is None:
                transport = self._transports[index] = self._connect(self.addresses[index])
            return transport

    def _deadline(self, timeout: float | None) -> float | None:
        return self.timeout if timeout is None else timeout

    def _plan(self, timeout: float | None) -> Plan:
        return Plan(self._rotation, self._deadline(timeout), self.max_attempts)

    def _disconnect(self) -> list[TransportT]:
        """The transports made so far, forgotten (for the caller to close)."""
        with self._lock:
            made = [t for t in self._transports if t is not None]
            self._transports = [None] * len(self.addresses)
        return made


class SessionBase:
    """A server-held session's fields, as the server last told them."""

    session_id: str = ""
    model: str = ""
    version: int = 0
    pooling: str = ""
    steps: int = 0
    # A chunk's deadline when `send` gives none (the client's default).
    timeout: float | None = None

    def _opened(self, opened: SessionOpened) -> None:
        self.session_id, self.model, self.version = opened.session_id, opened.model, opened.version
        self.pooling, self.steps = opened.pooling, opened.steps

    def _chunk(self, chunk: Any, timeout: float | None) -> tuple[Chunk, float | None]:
        """A chunk the caller gives, checked, and its deadline."""
        return chunk_of(chunk), self.timeout if timeout is None else timeout

    def _answered(self, result: ChunkResult) -> ChunkResult:
        self.steps = result.steps
        return result


def answer_type(build: Callable[..., Any]) -> Any:
    """What a call of `_calls.py` answers: `T` of its `Call[T]`."""
    return typing.get_args(typing.get_type_hints(build)["return"])[0]


def method(
    function: F,
    build: Callable[..., Any],
    owner: str,
    returns: Any,
    *,
    name: str | None = None,
    doc: str | None = None,
) -> F:
    """`function`, the method `name` (default: `build`'s) of class `owner` that makes the call
    `build` describes, given `build`'s parameters (after `self`), docstring (or `doc`) and
    annotations, returning `returns`: what `help()`, editors and `typing.get_type_hints` show."""
    name = build.__name__ if name is None else name
    signature = inspect.signature(build, eval_str=True)
    this = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)
    made: Any = function
    made.__name__, made.__qualname__ = name, f"{owner}.{name}"
    made.__doc__ = build.__doc__ if doc is None else doc
    made.__signature__ = signature.replace(
        parameters=[this, *signature.parameters.values()], return_annotation=returns
    )
    made.__annotations__ = typing.get_type_hints(build) | {"return": returns}
    return function
