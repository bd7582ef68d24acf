"""The client's calls, once for both clients and both wires (no I/O here).

Each function below is one public call: its parameters, the checks of what the caller gives
(`_inputs.py`) and its docstring. It answers a `Call` — what to send, built for the wire of the
address that sends it (`_http.py`, `_grpc.py`), and how the answer reads. `Client` and
`AsyncClient` take their methods from these functions (`_base.method`), so the two share every
signature and differ only in how they do I/O.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from rnnserve_client import _grpc, _http
from rnnserve_client._inputs import (
    EncodeArgs,
    GenerateArgs,
    SessionArgs,
    StreamArgs,
    batch_of,
    chunk_of,
)
from rnnserve_client.results import (
    ChunkResult,
    EncodeResult,
    GenerateResult,
    ModelInfo,
    SessionOpened,
    TokenEvent,
)

T = TypeVar("T")
# What `generate_stream` yields: each token as it is decoded, then the result.
Event = TokenEvent | GenerateResult


@dataclass(frozen=True)
class Call(Generic[T]):
    """One call: the caller's deadline, and its request on each wire (built when sent; a
    generate's with `stream=True` for `generate_stream`)."""

    # Seconds for the whole call, retries included (None: the client's default).
    timeout: float | None
    on_http: Callable[..., _http.Request[T]]
    on_grpc: Callable[..., _grpc.Request[T]]
    args: tuple[Any, ...] = ()

    def http(self, **options: Any) -> _http.Request[T]:
        """The call over REST."""
        return self.on_http(*self.args, **options)

    def grpc(self, **options: Any) -> _grpc.Request[T]:
        """The call over gRPC."""
        return self.on_grpc(*self.args, **options)


def encode(
    model: str,
    *,
    inputs: Any = None,
    tokens: Any = None,
    texts: Any = None,
    pooling: str | None = None,
    version: int | None = None,
    timeout: float | None = None,
) -> Call[EncodeResult]:
    """Encode sequences: `inputs` ([time][features] numbers each), `tokens` (id lists) or
    `texts`; `pooling` last|mean|max|none (default: the model's)."""
    asked = EncodeArgs(model, batch_of(inputs, tokens, texts), pooling, version)
    return Call(timeout, _http.encode, _grpc.encode, (asked,))


def generate(
    model: str,
    *,
    inputs: Any = None,
    tokens: Any = None,
    texts: Any = None,
    beam_size: int | None = None,
    max_length: int | None = None,
    version: int | None = None,
    timeout: float | None = None,
) -> Call[GenerateResult]:
    """Generate one output per input with a seq2seq model (greedy, or beam search with
    `beam_size` > 1): a sequence of outputs with `.tokens` and `.text`."""
    asked = GenerateArgs(model, batch_of(inputs, tokens, texts), max_length, beam_size, version)
    return Call(timeout, _http.generate, _grpc.generate, (asked,))


# `generate_stream` takes the arguments of `generate`.
GENERATE_STREAM_DOC = (
    "Generate, yielding each `TokenEvent` as it is decoded, then the `GenerateResult`.\n"
    "Retried like `generate` until the first event arrives, never after."
)


def stream(
    model: str,
    chunk: Any,
    state_token: str | bytes | None = None,
    *,
    pooling: str | None = None,
    version: int | None = None,
    timeout: float | None = None,
) -> Call[ChunkResult]:
    """Encode one more chunk of a stream whose state travels in `state_token` (None: a new
    stream); pass the result's `.state_token` with the next chunk, to any replica."""
    asked = StreamArgs(model, chunk_of(chunk), pooling, state_token, version)
    return Call(timeout, _http.stream, _grpc.stream, (asked,))


def session(
    model: str,
    *,
    pooling: str | None = None,
    version: int | None = None,
    return_state: bool = False,
    state_token: str | bytes | None = None,
    timeout: float | None = None,
) -> Call[SessionOpened]:
    """Open a server-held session: `with client.session("m") as s: s.send(chunk)` (with
    `AsyncClient`: `async with`, or `await session.open()`)."""
    asked = SessionArgs(model, pooling, return_state, state_token, version)
    return Call(timeout, _http.open_session, _grpc.open_session, (asked,))


def models(*, timeout: float | None = None) -> Call[list[ModelInfo]]:
    """Every model the server knows, with its versions' states."""
    return Call(timeout, _http.models, _grpc.models)


def model(name: str, *, timeout: float | None = None) -> Call[ModelInfo]:
    """One model: versions, states (with failure reasons), architecture."""
    return Call(timeout, _http.model, _grpc.model, (name,))
