"""gRPC call plumbing shared by the servicers: parsing requests in the handlers (so that a
message that does not parse, or costs too much to parse, is INVALID_ARGUMENT like any bad
request), ending calls with a status, call deadlines, request metrics, the drain watch of
streams, and the management rule.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, ClassVar, Generic, NoReturn, TypeAlias, TypeVar

import grpc
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from google.protobuf.message import DecodeError, Message
from google.protobuf.message_factory import GetMessageClass

from service.core import errors, limits, management
from service.core.engine import Engine
from service.core.metrics import Metrics
from service.core.request_metrics import Observed, RequestMetrics
from service.core.settings import Settings
from service.core.types import AnswerLimit, Wire
from service.grpc_api.errors import error_metadata, grpc_status
from service.grpc_api.message_limits import MessageLimits

log = logging.getLogger(__name__)

T = TypeVar("T")
M = TypeVar("M", bound=Message)
Context: TypeAlias = grpc.aio.ServicerContext[Any, Any]


def deadline_of(context: Context) -> float | None:
    """Seconds left before the call's gRPC deadline (None: the client set none)."""
    remaining = context.time_remaining()
    return None if remaining is None else max(0.0, remaining)


class CallAborted(Exception):
    """Ends a call with a status: raised by `abort_with`, turned into the call's status by the
    method handlers of `add_service`."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


def call_status(context: Context, exc: BaseException) -> CallAborted:
    """The status that ends a call failed by `exc` (its table entry, or INTERNAL without
    details); the error's trailing metadata is set on `context`."""
    if isinstance(exc, errors.ServiceError):
        code, message = grpc_status(exc)
        context.set_trailing_metadata(error_metadata(exc))
        return CallAborted(code, message)
    log.exception("unexpected error in a gRPC handler", exc_info=exc)
    return CallAborted(grpc.StatusCode.INTERNAL, "internal error (see the server log)")


async def abort_with(context: Context, exc: BaseException) -> NoReturn:
    """End the call with the status of `exc`: its table entry, or INTERNAL without details.

    Raises CallAborted, not grpc's `context.abort`: grpc keeps the AbortError that one raises in
    the call's state, and through its traceback every frame it left (the request and all that
    was decoded from it) in a reference cycle that only a full collection frees, many calls
    later (`python -m bench.edge`).
    """
    raise call_status(context, exc)


def _end_call(context: Context, aborted: CallAborted) -> None:
    # NOTE: a status set on the context ends the call once the handler returns; a unary answer
    # returned with it (None here) is discarded by grpc.
    context.set_code(aborted.code)
    context.set_details(aborted.details)


def end_call(context: Context, exc: BaseException) -> None:
    """End the call with the status of `exc` once the handler returns (a raw method's errors,
    `add_service`): as `abort_with`, without raising."""
    _end_call(context, call_status(context, exc))


# --- requests grpc cannot parse -----------------------------------------------------------------

# NOTE: grpc parses a request with the deserializer of its method handler before any servicer code
# runs, and answers a DecodeError (invalid UTF-8 in a string, a truncated field) with UNKNOWN
# "Unexpected <class ...>". So the services are registered with handlers that take raw bytes
# and parse them here, where a bad message is InvalidInput like any other bad request.


def parse_request(message_type: type[M], data: bytes, limits: MessageLimits | None = None) -> M:
    """`data` as a `message_type`; `InvalidInput("request")` when it does not parse, and
    `PayloadTooLarge("request")` when it passes `limits` (checked before parsing)."""
    if limits is not None:
        limits.check(data, message_type.DESCRIPTOR)
    try:
        return message_type.FromString(data)
    except DecodeError:
        name = message_type.DESCRIPTOR.full_name
        raise errors.InvalidInput("request", f"not a valid {name} message") from None


class ParsedRequests(Generic[M]):
    """A client stream's messages, parsed as they come. One that does not parse raises
    InvalidInput for itself only: the servicer may answer it and read on (ModelStreamInfer)."""

    def __init__(
        self, raw: AsyncIterator[bytes], message_type: type[M], limits: MessageLimits | None = None
    ) -> None:
        self._raw = raw
        self._type = message_type
        self._limits = limits

    def __aiter__(self) -> ParsedRequests[M]:
        return self

    async def __anext__(self) -> M:
        return parse_request(self._type, await anext(self._raw), self._limits)


def _parsing_handler(
    method: MethodDescriptor,
    behaviour: Any,
    on_unparsed: Callable[[errors.InvalidInput, float], None],
    limits: MessageLimits | None,
) -> grpc.RpcMethodHandler:
    """The handler of one RPC: raw request bytes in, checked against `limits` and parsed here,
    then `behaviour` called; `on_unparsed(error, seconds)` records a request refused before it
    parsed (it never reaches `behaviour`). A CallAborted from anywhere below ends the call."""
    request_type: type[Message] = GetMessageClass(method.input_type)
    serialize = GetMessageClass(method.output_type).SerializeToString

    async def parsed(data: bytes, context: Context) -> Message:
        start = time.perf_counter()
        try:
            return parse_request(request_type, data, limits)
        except errors.InvalidInput as exc:
            on_unparsed(exc, time.perf_counter() - start)
            await abort_with(context, exc)

    async def stream_of(raw: AsyncIterator[bytes], context: Context) -> ParsedRequests[Message]:
        return ParsedRequests(raw, request_type, limits)

    read = stream_of if method.client_streaming else parsed

    async def streamed(received: Any, context: Context) -> AsyncIterator[Any]:
        try:
            request = await read(received, context)
            async with contextlib.aclosing(behaviour(request, context)) as responses:
                async for response in responses:
                    yield response
        except CallAborted as aborted:
            _end_call(context, aborted)

    if method.client_streaming:
        # NOTE: the protos have no stream-in, unary-out RPC; it would need its own case here.
        assert method.server_streaming, f"{method.full_name}: client stream, unary answer"
        return grpc.stream_stream_rpc_method_handler(streamed, response_serializer=serialize)
    if method.server_streaming:
        return grpc.unary_stream_rpc_method_handler(streamed, response_serializer=serialize)

    async def unary_unary(data: bytes, context: Context) -> Any:
        try:
            return await behaviour(await parsed(data, context), context)
        except CallAborted as aborted:
            _end_call(context, aborted)
            return None

    return grpc.unary_unary_rpc_method_handler(unary_unary, response_serializer=serialize)


def add_service(
    server: grpc.aio.Server,
    service: ServiceDescriptor,
    servicer: EngineServicer,
    limits: MessageLimits | None = None,
) -> None:
    """Serve `service` with `servicer`'s methods (one per RPC, as the generated base class names
    them), each parsing its own requests so that a bad message is INVALID_ARGUMENT, and one
    over `limits` is refused before parsing. A request refused before it parsed is counted
    under its RPC's entry in `servicer.ENDPOINTS` (RPC name → endpoint label; RPCs without one
    are not counted, as when they succeed). The unary RPCs of `servicer.RAW_METHODS` take the
    request's bytes and return the answer's bytes: they parse, count and end their calls
    themselves (`end_call`)."""

    def recorder(rpc: str) -> Callable[[errors.InvalidInput, float], None]:
        endpoint = servicer.ENDPOINTS.get(rpc)

        def record(exc: errors.InvalidInput, seconds: float) -> None:
            if endpoint is not None:
                servicer.calls.requests.record("", None, endpoint, exc, seconds)

        return record

    def handler(method: MethodDescriptor) -> grpc.RpcMethodHandler:
        behaviour = getattr(servicer, method.name)
        if method.name in servicer.RAW_METHODS:
            assert not method.client_streaming and not method.server_streaming, method.full_name
            return grpc.unary_unary_rpc_method_handler(behaviour)
        return _parsing_handler(method, behaviour, recorder(method.name), limits)

    handlers = {m.name: handler(m) for m in service.methods}
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service.full_name, handlers),)
    )


class DrainWatch:
    """Ends a stream's wait for its client's next message once the server drains: `read`
    raises `Draining` (UNAVAILABLE) instead of waiting on. One watcher task per stream, made in
    the task that reads (the handler's, or a reader task of its own)."""

    def __init__(self, until_draining: Callable[[], Awaitable[None]]) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._task = task
        self._reading = False
        self._drained = False
        self._watcher = asyncio.ensure_future(until_draining())
        self._watcher.add_done_callback(self._on_drain)

    def _on_drain(self, watcher: asyncio.Future[None]) -> None:
        if watcher.cancelled():
            return
        self._drained = True
        if self._reading:
            self._task.cancel()

    async def read(self, messages: AsyncIterator[M]) -> M | None:
        """The next message (None at the end of the client's stream)."""
        if self._drained:
            raise errors.Draining("the server is shutting down; this stream takes no more messages")
        self._reading = True
        try:
            return await anext(messages, None)
        except asyncio.CancelledError:
            if self._drained and self._task.uncancel() == 0:
                raise errors.Draining(
                    "the server is shutting down; this stream takes no more messages"
                ) from None
            raise
        finally:
            self._reading = False

    def close(self) -> None:
        """Stop watching (the stream ended)."""
        self._watcher.cancel()


class CallRecorder:
    """The request metrics of one gRPC service (service/core/request_metrics.py), and the rule
    that an answer fits in a message. Failed calls for unknown models get blank labels."""

    def __init__(self, requests: RequestMetrics, max_answer_bytes: int | None = None) -> None:
        self.requests = requests
        self.max_answer_bytes = max_answer_bytes

    def known(self, model: str) -> bool:
        """Whether the server knows `model` (a label it may take)."""
        return self.requests.known(model, None)

    def check_answer(self, answer: object) -> None:
        """`InvalidInput("answer")` for an answer message over the gRPC message limit: grpc
        would fail it (RESOURCE_EXHAUSTED) only after the handler returned, counted as a
        success. Encode answers are refused before compute (`limits.check_answer_size`); this
        catches the rest."""
        if self.max_answer_bytes is None:
            return
        if isinstance(answer, bytes):
            size = len(answer)
        elif isinstance(answer, Message):
            size = answer.ByteSize()
        else:
            return
        if size > self.max_answer_bytes:
            raise errors.InvalidInput(
                "answer",
                f"the answer takes {size:,} bytes; the limit is {self.max_answer_bytes:,} "
                "(--grpc-max-message-bytes): ask for less in one call",
            )

    def observe(self, model: str, version: int | None, endpoint: str) -> Observed:
        """Observe one call (or one message of a stream) until the block ends."""
        return self.requests.observe(model, version, endpoint)

    async def run(
        self,
        context: Context,
        model: str,
        endpoint: str,
        call: Callable[[], Awaitable[T]],
        version: Callable[[T], int | None] = lambda _: None,
    ) -> T:
        """Await `call()` observed, its answer labelled with `version(answer)`; an error ends
        the call with its status (`abort_with`)."""

        async def labelled(observed: Observed) -> T:
            answer = await call()
            observed.version = version(answer)
            return answer

        return await self.run_observed(context, model, endpoint, labelled)

    async def run_observed(
        self,
        context: Context,
        model: str,
        endpoint: str,
        call: Callable[[Observed], Awaitable[T]],
    ) -> T:
        """`run` for a call that labels its observation itself (`call(observed)`)."""
        try:
            with self.observe(model, None, endpoint) as observed:
                answer = await call(observed)
                self.check_answer(answer)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            await abort_with(context, exc)
        return answer


class EngineServicer:
    """What each gRPC service holds: the engine, the settings, the request metrics of its wire
    and the bound of its encode answers (`padded`: per-step encodings padded to the longest
    sequence, as V2's tensors are). A subclass names both: `class S(EngineServicer, wire=...,
    padded=...)`."""

    wire: ClassVar[Wire]
    padded_answers: ClassVar[bool]
    # The endpoint label of each RPC whose calls are counted (`add_service`).
    ENDPOINTS: ClassVar[dict[str, str]]
    # Unary RPCs on raw bytes, both ways (`add_service`).
    RAW_METHODS: ClassVar[frozenset[str]] = frozenset()

    def __init_subclass__(cls, *, wire: Wire, padded: bool, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.wire = wire
        cls.padded_answers = padded

    def __init__(self, engine: Engine, settings: Settings, metrics: Metrics) -> None:
        self.engine = engine
        self.settings = settings
        requests = RequestMetrics(metrics, self.wire, engine.knows)
        self.calls = CallRecorder(requests, settings.grpc_max_message_bytes)
        self.answers = answer_limit(settings, self.padded_answers)
        self.limits = MessageLimits.from_settings(settings)


def answer_limit(settings: Settings, padded: bool) -> AnswerLimit:
    """The largest encode answer a gRPC call sends (4 bytes a number): `max_answer_bytes`, or
    the message limit when lower (grpc would fail a larger answer only once built)."""
    return limits.answer_limit(
        settings,
        limits.BINARY_BYTES_PER_NUMBER,
        padded=padded,
        message_limit=(settings.grpc_max_message_bytes, "--grpc-max-message-bytes"),
    )


def check_management(settings: Settings, context: Context) -> None:
    """Allow a management call by the one rule of both wires (`management.authorize`)."""
    values = [v for k, v in context.invocation_metadata() or () if k == "authorization"]
    management.authorize(settings, [v if isinstance(v, str) else "" for v in values])
