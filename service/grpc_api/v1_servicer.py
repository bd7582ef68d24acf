"""rnnserve's own gRPC service, `rnnserve.v1.RnnServe`: each RPC converts its message
(service/grpc_api/convert.py), calls the engine, and converts the answer back; every error ends
the call through the one gRPC table (`calls.abort_with`). The session RPCs are
service/grpc_api/session_servicer.py's.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import ClassVar, TypeVar

from rnnserve_client.proto.rnnserve.v1 import rnnserve_pb2 as pb
from rnnserve_client.proto.rnnserve.v1 import rnnserve_pb2_grpc
from service.core import validation
from service.core.types import EncodeRequest
from service.grpc_api import convert, raw_messages, session_servicer
from service.grpc_api.calls import (
    Context,
    EngineServicer,
    abort_with,
    check_management,
    deadline_of,
    end_call,
    parse_request,
)

# The endpoint label of each unary or server-streaming RPC's calls (StreamSession's
# messages are counted by the stream itself).
RPC_ENDPOINTS: dict[str, str] = {
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

A = TypeVar("A")


class RnnServeServicer(
    EngineServicer, rnnserve_pb2_grpc.RnnServeServicer, wire="grpc", padded=False
):
    """rnnserve.v1.RnnServe on the engine."""

    ENDPOINTS: ClassVar[dict[str, str]] = RPC_ENDPOINTS
    RAW_METHODS: ClassVar[frozenset[str]] = frozenset({"Encode"})

    async def Encode(self, data: bytes, context: Context) -> bytes | None:  # noqa: N802 (gRPC method names)
        """An EncodeRequest's bytes in, the EncodeResponse's bytes out (raw_messages.py); None
        once the call ends with an error status."""
        try:
            with self.calls.observe("", None, "encode") as observed:
                request = self._encode_request(data, deadline_of(context))
                observed.model = request.model
                result = await self.engine.encode(request)
                observed.version = result.version
                answer = raw_messages.encode_response(result)
                self.calls.check_answer(answer)
                return answer
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            end_call(context, exc)
            return None

    def _encode_request(self, data: bytes, deadline_s: float | None) -> EncodeRequest:
        """The core's request of an EncodeRequest's bytes: read as they are when they hold
        feature sequences, else parsed by protobuf (InvalidInput when they do not parse)."""
        self.limits.check(data, pb.EncodeRequest.DESCRIPTOR)
        raw = raw_messages.read_encode_request(data)
        if raw is not None:
            return convert.encode_request_from_raw(raw, deadline_s, self.answers)
        message = parse_request(pb.EncodeRequest, data)
        return convert.encode_request_from_proto(message, deadline_s, self.answers)

    async def Generate(  # noqa: N802
        self, request: pb.GenerateRequest, context: Context
    ) -> pb.GenerateResponse:
        async def call() -> pb.GenerateResponse:
            core = convert.generate_request_from_proto(request, deadline_of(context))
            return convert.generate_result_to_proto(await self.engine.generate(core))

        return await self.calls.run(context, request.model, "generate", call, lambda r: r.version)

    async def GenerateStream(  # noqa: N802
        self, request: pb.GenerateRequest, context: Context
    ) -> AsyncIterator[pb.GenerateStreamResponse]:
        try:
            with self.calls.observe(request.model, None, "generate_stream") as observed:
                core = convert.generate_request_from_proto(request, deadline_of(context))
                # NOTE: closed explicitly, so a client that goes away stops its decoding now.
                async with contextlib.aclosing(self.engine.generate_stream(core)) as events:
                    async for event in events:
                        message = convert.stream_event_to_proto(event)
                        if message.HasField("result"):
                            observed.version = message.result.version
                        yield message
        except (asyncio.CancelledError, GeneratorExit):
            # NOTE: the client went away: its task was cancelled while this stream awaited, or
            # grpc closed this generator at a `yield`. Observed once, as cancelled.
            raise
        except Exception as exc:
            await abort_with(context, exc)

    async def ListModels(  # noqa: N802
        self, request: pb.ListModelsRequest, context: Context
    ) -> pb.ListModelsResponse:
        async def call() -> pb.ListModelsResponse:
            models = self.engine.list_models()
            return pb.ListModelsResponse(models=[convert.model_info_to_proto(m) for m in models])

        return await self.calls.run(context, "", "list_models", call)

    async def GetModel(self, request: pb.GetModelRequest, context: Context) -> pb.ModelInfo:  # noqa: N802
        async def call() -> pb.ModelInfo:
            return self._model_info(request.name)

        return await self.calls.run(context, request.name, "get_model", call)

    async def LoadModel(self, request: pb.LoadModelRequest, context: Context) -> pb.ModelInfo:  # noqa: N802
        async def load() -> None:
            await self.engine.load(request.name, convert.optional_version(request))

        return await self._manage(context, request.name, "load", load, self._model_info)

    async def UnloadModel(  # noqa: N802
        self, request: pb.UnloadModelRequest, context: Context
    ) -> pb.UnloadModelResponse:
        async def unload() -> None:
            await self.engine.unload(request.name, convert.optional_version(request))

        return await self._manage(
            context, request.name, "unload", unload, lambda _: pb.UnloadModelResponse()
        )

    async def ReloadModel(self, request: pb.ReloadModelRequest, context: Context) -> pb.ModelInfo:  # noqa: N802
        async def reload() -> None:
            await self.engine.reload(request.name)

        return await self._manage(context, request.name, "reload", reload, self._model_info)

    async def StreamSession(  # noqa: N802
        self, requests: AsyncIterator[pb.SessionRequest], context: Context
    ) -> AsyncIterator[pb.SessionResponse]:
        # NOTE: grpc.aio streams only from an async generator function, so this one re-yields.
        replies = session_servicer.stream_session(
            self.engine.sessions, self.calls, requests, context, self.engine.until_draining
        )
        async for reply in replies:
            yield reply

    async def StreamChunk(  # noqa: N802
        self, request: pb.StreamChunkRequest, context: Context
    ) -> pb.SessionChunkResult:
        return await session_servicer.stream_chunk(
            self.engine.sessions, self.calls, request, context
        )

    def _model_info(self, name: str) -> pb.ModelInfo:
        return convert.model_info_to_proto(self.engine.model_info(name))

    async def _manage(
        self,
        context: Context,
        name: str,
        action: str,
        work: Callable[[], Awaitable[None]],
        answer: Callable[[str], A],
    ) -> A:
        """A management call: the one rule of both wires, a repository name, then `work`."""

        async def call() -> A:
            check_management(self.settings, context)
            validation.check_model_name(name)
            await work()
            return answer(name)

        return await self.calls.run(context, name, action, call)
