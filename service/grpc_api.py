"""The gRPC front-end: rnnserve.v1 servicer, health, reflection, and the grpc.aio server.

Servicers only convert (service/grpc_convert.py) and call the engine; every core error leaves
through one table (`grpc_convert.GRPC_STATUS`). `GrpcServer` wires both services (this one and
the Open Inference Protocol's, service/v2_grpc.py), `grpc.health.v1` and reflection; the two
services parse their own requests (`add_service`), so a message that does not parse is
INVALID_ARGUMENT too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any, ClassVar, Generic, NoReturn, TypeAlias, TypeVar

import grpc
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from google.protobuf.message import DecodeError, Message
from google.protobuf.message_factory import GetMessageClass
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from rnnserve_client.proto.inference import grpc_service_pb2 as v2_pb
from rnnserve_client.proto.rnnserve.v1 import rnnserve_pb2 as pb
from rnnserve_client.proto.rnnserve.v1 import rnnserve_pb2_grpc
from service import errors, grpc_convert, management, metric_labels, validation
from service.grpc_limits import MessageLimits
from service.metrics import Metrics, outcome_of
from service.settings import Settings
from service.types import AnswerLimit

if TYPE_CHECKING:
    from service.engine import Engine

log = logging.getLogger(__name__)

T = TypeVar("T")
M = TypeVar("M", bound=Message)
Context: TypeAlias = grpc.aio.ServicerContext[Any, Any]

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["RnnServe"].full_name
V2_SERVICE_NAME = v2_pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
HEALTH_POLL_S = 0.1


def deadline_of(context: grpc.aio.ServicerContext[Any, Any]) -> float | None:
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


def error_metadata(exc: errors.ServiceError) -> tuple[tuple[str, str], ...]:
    """Trailing metadata of a refused call: `rnnserve-error-type` (the core error's class, as
    REST's error body names it: one gRPC code covers both NotReady and Draining),
    `rnnserve-error-field` for invalid input, `retry-after` (seconds) when overloaded."""
    entries = [("rnnserve-error-type", type(exc).__name__)]
    if isinstance(exc, errors.InvalidInput) and exc.field.isascii() and exc.field.isprintable():
        entries.append(("rnnserve-error-field", exc.field))
    if isinstance(exc, errors.Overloaded):
        entries.append(("retry-after", f"{exc.retry_after_s:g}"))
    return tuple(entries)


async def abort_with(context: grpc.aio.ServicerContext[Any, Any], exc: BaseException) -> NoReturn:
    """End the call with the status of `exc`: its table entry, or INTERNAL without details.

    Raises CallAborted, not grpc's `context.abort`: grpc keeps the AbortError that one raises in
    the call's state, and through its traceback every frame it left (the request and all that
    was decoded from it) in a reference cycle that only a full collection frees, many calls
    later (a refused 57 MiB V2 request kept ~1.5 GB; `python -m bench.edge`).
    """
    if isinstance(exc, errors.ServiceError):
        code, message = grpc_convert.grpc_status(exc)
        context.set_trailing_metadata(error_metadata(exc))
        raise CallAborted(code, message)
    log.exception("unexpected error in a gRPC handler", exc_info=exc)
    raise CallAborted(grpc.StatusCode.INTERNAL, "internal error (see the server log)")


def _end_call(context: Context, aborted: CallAborted) -> None:
    # NOTE: a status set on the context ends the call once the handler returns; a unary answer
    # returned with it (None here) is discarded by grpc.
    context.set_code(aborted.code)
    context.set_details(aborted.details)


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

    if method.client_streaming:
        # NOTE: the protos have no stream-in, unary-out RPC; it would need its own case here.
        assert method.server_streaming, f"{method.full_name}: client stream, unary answer"

        async def stream_stream(raw: AsyncIterator[bytes], context: Context) -> AsyncIterator[Any]:
            requests = ParsedRequests(raw, request_type, limits)
            try:
                async with contextlib.aclosing(behaviour(requests, context)) as responses:
                    async for response in responses:
                        yield response
            except CallAborted as aborted:
                _end_call(context, aborted)

        return grpc.stream_stream_rpc_method_handler(stream_stream, response_serializer=serialize)
    if method.server_streaming:

        async def unary_stream(data: bytes, context: Context) -> AsyncIterator[Any]:
            try:
                request = await parsed(data, context)
                async with contextlib.aclosing(behaviour(request, context)) as responses:
                    async for response in responses:
                        yield response
            except CallAborted as aborted:
                _end_call(context, aborted)

        return grpc.unary_stream_rpc_method_handler(unary_stream, response_serializer=serialize)

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
    servicer: object,
    calls: CallRecorder,
    endpoints: dict[str, str],
    limits: MessageLimits | None = None,
) -> None:
    """Serve `service` with `servicer`'s methods (one per RPC, as the generated base class names
    them), each parsing its own requests so that a bad message is INVALID_ARGUMENT, and one
    over `limits` is refused before parsing. A request refused before it parsed is counted by
    `calls` under its RPC's entry in `endpoints` (RPC name → endpoint label; RPCs without one
    are not counted, as when they succeed)."""

    def recorder(rpc: str) -> Callable[[errors.InvalidInput, float], None]:
        endpoint = endpoints.get(rpc)

        def record(exc: errors.InvalidInput, seconds: float) -> None:
            if endpoint is not None:
                calls.observe("", None, endpoint, exc, seconds)

        return record

    handlers = {
        m.name: _parsing_handler(m, getattr(servicer, m.name), recorder(m.name), limits)
        for m in service.methods
    }
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
    """Times one call, records its metrics once, and maps its errors to gRPC statuses.

    Failed calls for unknown models get blank labels, as REST's (service/metric_labels.py).
    """

    def __init__(
        self,
        metrics: Metrics,
        protocol: str,
        known: metric_labels.Known,
        max_answer_bytes: int | None = None,
    ) -> None:
        self.metrics = metrics
        self.protocol = protocol
        self.known = known
        self.max_answer_bytes = max_answer_bytes

    def check_answer(self, answer: object) -> None:
        """`InvalidInput("answer")` for an answer message over the gRPC message limit: grpc
        would fail it (RESOURCE_EXHAUSTED) only after the handler returned, counted as a
        success. Encode answers are refused before compute (`validation.check_answer_size`);
        this catches the rest."""
        if self.max_answer_bytes is None or not isinstance(answer, Message):
            return
        size = answer.ByteSize()
        if size > self.max_answer_bytes:
            raise errors.InvalidInput(
                "answer",
                f"the answer takes {size:,} bytes; the limit is {self.max_answer_bytes:,} "
                "(--grpc-max-message-bytes): ask for less in one call",
            )

    async def run(
        self,
        context: grpc.aio.ServicerContext[Any, Any],
        model: str,
        endpoint: str,
        call: Callable[[], Awaitable[T]],
        version: Callable[[T], int | None] = lambda _: None,
    ) -> T:
        """Await `call()`; on a ServiceError abort with its status (the metrics say why)."""
        start = time.perf_counter()
        try:
            result = await call()
            self.check_answer(result)
        except asyncio.CancelledError as exc:
            self.observe(model, None, endpoint, exc, time.perf_counter() - start)
            raise
        except Exception as exc:
            self.observe(model, None, endpoint, exc, time.perf_counter() - start)
            await abort_with(context, exc)
        self.observe(model, version(result), endpoint, None, time.perf_counter() - start)
        return result

    def observe(
        self,
        model: str,
        version: int | None,
        endpoint: str,
        exc: BaseException | None,
        seconds: float,
    ) -> None:
        """Record one call (`run` does; streams, which handle their errors, call it directly)."""
        model, version = metric_labels.request_labels(self.known, model, version, exc)
        self.metrics.observe_request(
            model, version, self.protocol, endpoint, outcome_of(exc), seconds
        )


def answer_limit(settings: Settings, padded: bool) -> AnswerLimit:
    """The largest encode answer a gRPC call sends: max_answer_bytes, or the message limit when
    lower (grpc would fail a larger answer only once built); 4 bytes a number."""
    if settings.grpc_max_message_bytes < settings.max_answer_bytes:
        return AnswerLimit(settings.grpc_max_message_bytes, 4, padded, "--grpc-max-message-bytes")
    return AnswerLimit(settings.max_answer_bytes, 4, padded, "--max-answer-bytes")


def check_management(settings: Settings, context: grpc.aio.ServicerContext[Any, Any]) -> None:
    """Allow a management call by the one rule of both wires (`management.authorize`)."""
    values = [v for k, v in context.invocation_metadata() or () if k == "authorization"]
    management.authorize(settings, [v if isinstance(v, str) else "" for v in values])


class RnnServeServicer(rnnserve_pb2_grpc.RnnServeServicer):
    """rnnserve.v1.RnnServe on the engine."""

    # The endpoint label of each unary or server-streaming RPC's calls (StreamSession's
    # messages are counted by the stream itself).
    ENDPOINTS: ClassVar[dict[str, str]] = {
        "Encode": "encode",
        "Generate": "generate",
        "GenerateStream": "generate_stream",
        "ListModels": "list_models",
        "GetModel": "get_model",
        "LoadModel": "load",
        "UnloadModel": "unload",
        "ReloadModel": "reload",
        "StreamChunk": "stream",
    }

    def __init__(self, engine: Engine, settings: Settings, metrics: Metrics) -> None:
        self.engine = engine
        self.settings = settings
        self.calls = CallRecorder(
            metrics, "grpc", metric_labels.known_model(engine), settings.grpc_max_message_bytes
        )
        self.answers = answer_limit(settings, padded=False)

    async def Encode(  # noqa: N802 (gRPC method names)
        self, request: pb.EncodeRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.EncodeResponse:
        async def call() -> pb.EncodeResponse:
            core = grpc_convert.encode_request_from_proto(
                request, deadline_of(context), answer_limit=self.answers
            )
            return grpc_convert.encode_result_to_proto(await self.engine.encode(core))

        return await self.calls.run(context, request.model, "encode", call, lambda r: r.version)

    async def Generate(  # noqa: N802
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.GenerateResponse:
        async def call() -> pb.GenerateResponse:
            core = grpc_convert.generate_request_from_proto(request, deadline_of(context))
            return grpc_convert.generate_result_to_proto(await self.engine.generate(core))

        return await self.calls.run(context, request.model, "generate", call, lambda r: r.version)

    async def GenerateStream(  # noqa: N802
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.GenerateStreamResponse]:
        start = time.perf_counter()
        version: int | None = None
        try:
            core = grpc_convert.generate_request_from_proto(
                request, deadline_of(context), endpoint="generate_stream"
            )
            events = self.engine.generate_stream(core)
            try:
                async for event in events:
                    message = grpc_convert.stream_event_to_proto(event)
                    if message.HasField("result"):
                        version = message.result.version
                    yield message
            finally:
                # NOTE: closed explicitly, so a client that goes away stops its decoding now.
                close = getattr(events, "aclose", None)
                if close is not None:
                    await close()
        except (asyncio.CancelledError, GeneratorExit) as exc:
            # NOTE: the client went away: its task was cancelled while this stream awaited, or
            # grpc closed this generator at a `yield` (GeneratorExit). Counted once, cancelled.
            self.calls.observe(
                request.model, version, "generate_stream", exc, time.perf_counter() - start
            )
            raise
        except Exception as exc:
            self.calls.observe(
                request.model, version, "generate_stream", exc, time.perf_counter() - start
            )
            await abort_with(context, exc)
        else:
            self.calls.observe(
                request.model, version, "generate_stream", None, time.perf_counter() - start
            )

    async def ListModels(  # noqa: N802
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ListModelsResponse:
        async def call() -> pb.ListModelsResponse:
            models = self.engine.list_models()
            return pb.ListModelsResponse(
                models=[grpc_convert.model_info_to_proto(m) for m in models]
            )

        return await self.calls.run(context, "", "list_models", call)

    async def GetModel(  # noqa: N802
        self, request: pb.GetModelRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ModelInfo:
        async def call() -> pb.ModelInfo:
            return grpc_convert.model_info_to_proto(self.engine.model_info(request.name))

        return await self.calls.run(context, request.name, "get_model", call)

    async def LoadModel(  # noqa: N802
        self, request: pb.LoadModelRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ModelInfo:
        async def call() -> pb.ModelInfo:
            check_management(self.settings, context)
            validation.check_model_name(request.name)
            version = grpc_convert.optional_version(request)
            await self.engine.load(request.name, version)
            return grpc_convert.model_info_to_proto(self.engine.model_info(request.name))

        return await self.calls.run(context, request.name, "load", call)

    async def UnloadModel(  # noqa: N802
        self, request: pb.UnloadModelRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.UnloadModelResponse:
        async def call() -> pb.UnloadModelResponse:
            check_management(self.settings, context)
            validation.check_model_name(request.name)
            version = grpc_convert.optional_version(request)
            await self.engine.unload(request.name, version)
            return pb.UnloadModelResponse()

        return await self.calls.run(context, request.name, "unload", call)

    async def ReloadModel(  # noqa: N802
        self, request: pb.ReloadModelRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ModelInfo:
        async def call() -> pb.ModelInfo:
            check_management(self.settings, context)
            validation.check_model_name(request.name)
            await self.engine.reload(request.name)
            return grpc_convert.model_info_to_proto(self.engine.model_info(request.name))

        return await self.calls.run(context, request.name, "reload", call)

    # -- streaming sessions (service/session_grpc.py) --

    async def StreamSession(  # noqa: N802
        self,
        requests: AsyncIterator[pb.SessionRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[pb.SessionResponse]:
        from service import session_grpc

        # NOTE: grpc.aio streams only from an async generator function, so this one re-yields.
        replies = session_grpc.stream_session(
            self.engine.sessions, self.calls, requests, context, self.engine.until_draining
        )
        async for reply in replies:
            yield reply

    async def StreamChunk(  # noqa: N802
        self, request: pb.StreamChunkRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.SessionChunkResult:
        from service import session_grpc

        return await session_grpc.stream_chunk(self.engine.sessions, self.calls, request, context)


class HealthReporter:
    """Keeps `grpc.health.v1` in step with the engine: "" and each service follow readiness,
    each model name follows "has a READY version"; NOT_SERVING for good once draining."""

    def __init__(self, engine: Engine, servicer: HealthServicer) -> None:
        self.engine = engine
        self.servicer = servicer
        self._known: dict[str, int] = {}
        self._task: asyncio.Task[None] | None = None

    async def update(self) -> None:
        """Publish the current statuses (only the changed ones)."""
        ready = self.engine.ready and not self.engine.draining
        overall = SERVING if ready else NOT_SERVING
        statuses = {"": overall, SERVICE_NAME: overall, V2_SERVICE_NAME: overall}
        for info in self.engine.list_models():
            serving = ready and any(v.state == "READY" for v in info.versions)
            statuses[info.name] = SERVING if serving else NOT_SERVING
        for name in self._known.keys() - statuses.keys():
            statuses[name] = NOT_SERVING
        for name, status in statuses.items():
            if self._known.get(name) != status:
                await self.servicer.set(name, status)
                self._known[name] = status

    async def _run(self) -> None:
        while True:
            try:
                await self.update()
            except Exception:
                log.exception("health update failed")
            await asyncio.sleep(HEALTH_POLL_S)

    def start(self) -> None:
        """Start following the engine (inside the running loop)."""
        self._task = asyncio.get_running_loop().create_task(self._run(), name="grpc-health")

    async def shut_down(self) -> None:
        """NOT_SERVING everywhere, permanently (drain started)."""
        await self.servicer.enter_graceful_shutdown()

    async def stop(self) -> None:
        """Stop following the engine."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None


# gRPC core reads durations as int milliseconds, INT_MAX meaning "never".
_GRPC_NEVER_MS = 2**31 - 1


def grpc_milliseconds(seconds: float) -> int:
    """`seconds` as a gRPC core duration option (inf → INT_MAX, "never")."""
    if math.isinf(seconds):
        return _GRPC_NEVER_MS
    return min(_GRPC_NEVER_MS, max(1, round(seconds * 1000)))


def connection_age_options(settings: Settings) -> list[tuple[str, int]]:
    """Server options that end each connection gracefully after its age (gRFC A9): the core
    sends GOAWAY at the age (±10% jitter), so the client opens a new connection, through the
    Service, for its next calls; calls running then finish on the old one within the grace."""
    return [
        ("grpc.max_connection_age_ms", grpc_milliseconds(settings.grpc_max_connection_age_s)),
        (
            "grpc.max_connection_age_grace_ms",
            grpc_milliseconds(settings.grpc_max_connection_age_grace_s),
        ),
    ]


class GrpcServer:
    """Both gRPC services, health and reflection on one grpc.aio server bound to host:port."""

    def __init__(self, engine: Engine, settings: Settings, metrics: Metrics) -> None:
        self.engine = engine
        self.settings = settings
        self.metrics = metrics
        self.port: int | None = None
        self.server: grpc.aio.Server | None = None
        self.health: HealthReporter | None = None
        self._stopping: asyncio.Task[None] | None = None

    async def start(self) -> int:
        """Build, bind and start the server (inside the running loop); returns the bound port."""
        from service import v2_grpc

        limit = self.settings.grpc_max_message_bytes
        server = grpc.aio.server(
            options=[
                ("grpc.max_send_message_length", limit),
                ("grpc.max_receive_message_length", limit),
                ("grpc.so_reuseport", 0),
                *connection_age_options(self.settings),
            ]
        )
        limits = MessageLimits.from_settings(self.settings)
        servicer = RnnServeServicer(self.engine, self.settings, self.metrics)
        add_service(
            server,
            pb.DESCRIPTOR.services_by_name["RnnServe"],
            servicer,
            servicer.calls,
            servicer.ENDPOINTS,
            limits,
        )
        inference = v2_grpc.InferenceServicer(self.engine, self.settings, self.metrics)
        add_service(
            server,
            v2_pb.DESCRIPTOR.services_by_name["GRPCInferenceService"],
            inference,
            inference.calls,
            inference.ENDPOINTS,
            limits,
        )
        health_servicer = HealthServicer()
        # NOTE: the library starts "" as SERVING; nothing is ready before the models load.
        await health_servicer.set("", NOT_SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        reflection.enable_server_reflection(
            (
                SERVICE_NAME,
                V2_SERVICE_NAME,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ),
            server,
        )
        address = f"{self.settings.host}:{self.settings.grpc_port}"
        try:
            port = server.add_insecure_port(address)
        except RuntimeError as exc:
            raise OSError(f"gRPC cannot bind {address} (in use, or not an address here)") from exc
        await server.start()
        self.server, self.port = server, port
        self.health = HealthReporter(self.engine, health_servicer)
        self.health.start()
        return port

    async def refresh_health(self) -> None:
        """Publish the engine's current state to the health service now (not at the next poll)."""
        if self.health is not None:
            await self.health.update()

    async def begin_drain(self) -> None:
        """Readiness off at once (every health service NOT_SERVING), and every connection told
        to go away (GOAWAY): clients open new ones, through the Service, to other replicas;
        calls already running here go on (`stop` bounds them)."""
        if self.health is not None:
            await self.health.stop()
            await self.health.shut_down()
        if self.server is not None and self._stopping is None:
            # NOTE: grpc.aio's stop sends GOAWAY and stops listening at once; the grace given
            # here is only an upper bound, `stop` below cuts running calls sooner.
            self._stopping = asyncio.get_running_loop().create_task(
                self.server.stop(self.settings.drain_grace_s + 5.0), name="grpc-goaway"
            )
            # NOTE: one turn of the loop runs the stop up to its GOAWAY (grpc.aio starts the
            # core's shutdown before its first await), so that connections are told to go
            # away before the engine starts refusing what still arrives on them.
            await asyncio.sleep(0)

    async def stop(self, grace_s: float | None) -> None:
        """Stop accepting calls; let running ones finish for up to `grace_s` seconds."""
        if self.health is not None:
            await self.health.stop()
        if self.server is not None:
            # NOTE: a second stop call waits `grace_s`, then cancels what still runs.
            await self.server.stop(grace_s)
        if self._stopping is not None:
            await self._stopping


def create_grpc_server(engine: Engine, settings: Settings, metrics: Metrics) -> GrpcServer:
    """The gRPC front-end of `engine` (call `await server.start()` inside the loop)."""
    return GrpcServer(engine, settings, metrics)
