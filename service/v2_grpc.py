"""The Open Inference Protocol (KServe V2) gRPC servicer: `inference.GRPCInferenceService`.

An encoder answers ModelInfer with ENCODING (+ SCORES, LABELS with a head); a seq2seq model with
OUTPUT_TOKENS, OUTPUT_LENGTHS (+ OUTPUT_TEXT). Outputs always travel as raw contents (as
Triton's do); inputs may be raw or typed. What the protocol answers is decided in
service/v2_common.py (shared with V2 REST); protobuf conversion lives in service/grpc_convert.py.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterable, AsyncIterator
from typing import TYPE_CHECKING, Any, ClassVar, TypeAlias

import grpc

from rnnserve_client.proto.inference import grpc_service_pb2 as v2
from rnnserve_client.proto.inference import grpc_service_pb2_grpc
from service import errors, grpc_convert, management, metric_labels, v2_common, validation
from service.grpc_api import (
    CallRecorder,
    DrainWatch,
    abort_with,
    answer_limit,
    check_management,
    deadline_of,
)
from service.metrics import Metrics
from service.settings import Settings

if TYPE_CHECKING:
    from service.engine import Engine

log = logging.getLogger(__name__)

Context: TypeAlias = grpc.aio.ServicerContext[Any, Any]


def _version(text: str, field: str = "model_version") -> int | None:
    """A V2 version string ("" = the server's choice) as the engine's int version."""
    return validation.parse_version(text, field) if text else None


def _tensor_metadata(
    tensors: list[v2_common.TensorMetadata],
) -> list[v2.ModelMetadataResponse.TensorMetadata]:
    return [
        v2.ModelMetadataResponse.TensorMetadata(name=t.name, datatype=t.datatype, shape=t.shape)
        for t in tensors
    ]


def _repository_parameters(
    request: v2.RepositoryModelLoadRequest | v2.RepositoryModelUnloadRequest,
) -> dict[str, Any]:
    """A repository request's parameters as plain values (None for one with no value set)."""
    return {
        name: getattr(param, which) if (which := param.WhichOneof("parameter_choice")) else None
        for name, param in request.parameters.items()
    }


class InferenceServicer(grpc_service_pb2_grpc.GRPCInferenceServiceServicer):
    """inference.GRPCInferenceService on the engine."""

    # The endpoint label of each unary RPC's calls (server liveness, readiness and metadata
    # are not counted; ModelStreamInfer counts its messages itself).
    ENDPOINTS: ClassVar[dict[str, str]] = {
        "ModelReady": "model_ready",
        "ModelMetadata": "model_metadata",
        "ModelInfer": "infer",
        "RepositoryIndex": "repository_index",
        "RepositoryModelLoad": "repository_load",
        "RepositoryModelUnload": "repository_unload",
    }

    def __init__(self, engine: Engine, settings: Settings, metrics: Metrics) -> None:
        self.engine = engine
        self.settings = settings
        self.calls = CallRecorder(
            metrics, "v2-grpc", metric_labels.known_model(engine), settings.grpc_max_message_bytes
        )
        self.answers = answer_limit(settings, padded=True)

    async def ServerLive(  # noqa: N802 (gRPC method names)
        self, request: v2.ServerLiveRequest, context: Context
    ) -> v2.ServerLiveResponse:
        return v2.ServerLiveResponse(live=self.engine.live)

    async def ServerReady(  # noqa: N802
        self, request: v2.ServerReadyRequest, context: Context
    ) -> v2.ServerReadyResponse:
        return v2.ServerReadyResponse(ready=self.engine.ready and not self.engine.draining)

    async def ModelReady(  # noqa: N802
        self, request: v2.ModelReadyRequest, context: Context
    ) -> v2.ModelReadyResponse:
        version: int | None = None

        async def call() -> v2.ModelReadyResponse:
            nonlocal version
            version = _version(request.version, "version")
            try:
                ready = v2_common.model_ready(self.engine, request.name, version)
            except errors.NotFound:
                # NOTE: an answer (ready: false, as Triton's), yet made-up names and versions
                # must not become label values: counted as for a refusal.
                ready = False
                version = None
            return v2.ModelReadyResponse(ready=ready)

        model = request.name if self.calls.known(request.name, None) else ""
        return await self.calls.run(context, model, "model_ready", call, lambda _: version)

    async def ServerMetadata(  # noqa: N802
        self, request: v2.ServerMetadataRequest, context: Context
    ) -> v2.ServerMetadataResponse:
        return v2.ServerMetadataResponse(
            name=v2_common.SERVER_NAME,
            version=v2_common.server_version(),
            extensions=["model_repository"],
        )

    async def ModelMetadata(  # noqa: N802
        self, request: v2.ModelMetadataRequest, context: Context
    ) -> v2.ModelMetadataResponse:
        resolved: int | None = None

        async def call() -> v2.ModelMetadataResponse:
            nonlocal resolved
            version, config = self.engine.model_config(
                request.name, _version(request.version, "version")
            )
            resolved = version
            return v2.ModelMetadataResponse(
                name=request.name,
                versions=v2_common.ready_versions(self.engine, request.name) or [str(version)],
                platform=v2_common.SERVER_NAME,
                inputs=_tensor_metadata(v2_common.input_metadata(config)),
                outputs=_tensor_metadata(v2_common.output_metadata(config)),
                parameters={
                    key: v2.InferParameter(string_param=value)
                    for key, value in v2_common.precision_parameters(
                        self.engine, request.name, version
                    ).items()
                },
            )

        return await self.calls.run(
            context, request.name, "model_metadata", call, lambda _: resolved
        )

    async def _infer(
        self, request: v2.ModelInferRequest, deadline_s: float | None, endpoint: str
    ) -> v2.ModelInferResponse:
        version, config = self.engine.infer_config(
            request.model_name, _version(request.model_version)
        )
        infer = grpc_convert.v2_infer_request(
            request,
            config,
            version,
            deadline_s,
            limit=self.settings.max_sequences_per_request,
            endpoint=endpoint,
            answer_limit=self.answers,
        )
        answered, outputs = await v2_common.infer(self.engine, infer, config)
        return grpc_convert.v2_infer_response(request, answered, outputs)

    async def ModelInfer(  # noqa: N802
        self, request: v2.ModelInferRequest, context: Context
    ) -> v2.ModelInferResponse:
        async def call() -> v2.ModelInferResponse:
            return await self._infer(request, deadline_of(context), "infer")

        return await self.calls.run(
            context, request.model_name, "infer", call, lambda r: int(r.model_version)
        )

    async def ModelStreamInfer(  # noqa: N802
        self, request_iterator: AsyncIterable[v2.ModelInferRequest], context: Context
    ) -> AsyncIterator[v2.ModelStreamInferResponse]:
        # NOTE: requests run concurrently (so they can share batches); answers go out in order
        # of completion, and a failed request answers with error_message instead of failing the
        # stream, as Triton does.
        answers: asyncio.Queue[v2.ModelStreamInferResponse | None] = asyncio.Queue()
        running: set[asyncio.Task[None]] = set()
        # NOTE: one permit per request read, given back once its answer went out: a client that
        # stops reading stops the stream reading its requests (HTTP/2 flow control then holds
        # its sends), instead of the server running and keeping answers without bound.
        pending = asyncio.Semaphore(self.settings.max_stream_pending)

        async def fail(request: v2.ModelInferRequest, message: str) -> None:
            failed = v2.ModelInferResponse(
                model_name=request.model_name, model_version=request.model_version, id=request.id
            )
            answer = v2.ModelStreamInferResponse(error_message=message, infer_response=failed)
            await answers.put(answer)

        async def one(request: v2.ModelInferRequest) -> None:
            start = time.perf_counter()
            try:
                response = await self._infer(request, deadline_of(context), "stream_infer")
                self.calls.check_answer(response)
            except asyncio.CancelledError as exc:
                self.calls.observe(
                    request.model_name, None, "stream_infer", exc, time.perf_counter() - start
                )
                raise
            except Exception as exc:
                self.calls.observe(
                    request.model_name, None, "stream_infer", exc, time.perf_counter() - start
                )
                if isinstance(exc, errors.ServiceError):
                    message = exc.message
                else:
                    log.exception("unexpected error in ModelStreamInfer", exc_info=exc)
                    message = "internal error (see the server log)"
                await fail(request, message)
                return
            self.calls.observe(
                request.model_name,
                int(response.model_version),
                "stream_infer",
                None,
                time.perf_counter() - start,
            )
            await answers.put(v2.ModelStreamInferResponse(infer_response=response))

        drained: list[errors.Draining] = []

        async def read() -> None:
            requests = aiter(request_iterator)
            watch = DrainWatch(self.engine.until_draining)
            try:
                while True:
                    await pending.acquire()
                    try:
                        request = await watch.read(requests)
                    except errors.Draining as exc:
                        # NOTE: the server drains: requests under way are answered, then the
                        # stream ends with UNAVAILABLE.
                        drained.append(exc)
                        break
                    except errors.InvalidInput as exc:
                        # NOTE: a message that does not parse (grpc_api.ParsedRequests) is
                        # answered inline like any failed request, and the stream reads on.
                        self.calls.observe("", None, "stream_infer", exc, 0.0)
                        await fail(v2.ModelInferRequest(), exc.message)
                        continue
                    if request is None:
                        break
                    task = asyncio.get_running_loop().create_task(one(request))
                    running.add(task)
                    task.add_done_callback(running.discard)
                await asyncio.gather(*running)
            finally:
                watch.close()
                # NOTE: always, so the writer below never waits for answers that cannot come.
                answers.put_nowait(None)

        reader = asyncio.get_running_loop().create_task(read())
        try:
            while (answer := await answers.get()) is not None:
                yield answer
                pending.release()
            await reader
        finally:
            for task in (reader, *running):
                task.cancel()
        if drained:
            await abort_with(context, drained[0])

    async def RepositoryIndex(  # noqa: N802
        self, request: v2.RepositoryIndexRequest, context: Context
    ) -> v2.RepositoryIndexResponse:
        async def call() -> v2.RepositoryIndexResponse:
            check_management(self.settings, context)
            index = v2.RepositoryIndexResponse()
            for model, v in v2_common.repository_index(self.engine, request.ready):
                index.models.add(
                    name=model, version=str(v.version), state=v.state, reason=v.reason or ""
                )
            return index

        return await self.calls.run(context, "", "repository_index", call)

    async def RepositoryModelLoad(  # noqa: N802
        self, request: v2.RepositoryModelLoadRequest, context: Context
    ) -> v2.RepositoryModelLoadResponse:
        async def call() -> v2.RepositoryModelLoadResponse:
            check_management(self.settings, context)
            validation.check_model_name(request.model_name, "model_name")
            management.check_repository_parameters(_repository_parameters(request))
            await v2_common.repository_load(self.engine, request.model_name)
            return v2.RepositoryModelLoadResponse()

        return await self.calls.run(context, request.model_name, "repository_load", call)

    async def RepositoryModelUnload(  # noqa: N802
        self, request: v2.RepositoryModelUnloadRequest, context: Context
    ) -> v2.RepositoryModelUnloadResponse:
        async def call() -> v2.RepositoryModelUnloadResponse:
            check_management(self.settings, context)
            validation.check_model_name(request.model_name, "model_name")
            management.check_repository_parameters(_repository_parameters(request))
            await self.engine.unload(request.model_name)
            return v2.RepositoryModelUnloadResponse()

        return await self.calls.run(context, request.model_name, "repository_unload", call)
