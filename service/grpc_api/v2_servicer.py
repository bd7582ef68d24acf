"""The Open Inference Protocol's (KServe V2) gRPC service, `inference.GRPCInferenceService`.

An encoder answers ModelInfer with ENCODING (+ SCORES, LABELS with a head); a seq2seq model with
OUTPUT_TOKENS, OUTPUT_LENGTHS (+ OUTPUT_TEXT). Outputs always travel as raw contents (as Triton's
do); inputs may be raw or typed. What the protocol means is service/inference_protocol's
(shared with V2 over HTTP); protobuf conversion is service/grpc_api/convert.py's.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from typing import ClassVar

from rnnserve_client.proto.inference import grpc_service_pb2 as v2
from rnnserve_client.proto.inference import grpc_service_pb2_grpc
from service.core import errors, management, validation
from service.core.release import SERVER_NAME, server_version
from service.core.request_metrics import Observed
from service.grpc_api import convert, raw_messages
from service.grpc_api.calls import (
    Context,
    DrainWatch,
    EngineServicer,
    abort_with,
    check_management,
    deadline_of,
    end_call,
    parse_request,
)
from service.inference_protocol import metadata, requests
from service.inference_protocol.tensors import V2Output

# The endpoint label of each unary RPC's calls (server liveness, readiness and metadata
# are not counted; ModelStreamInfer counts its messages itself).
RPC_ENDPOINTS: dict[str, str] = {
    "ModelReady": "model_ready",
    "ModelMetadata": "model_metadata",
    "ModelInfer": "infer",
    "RepositoryIndex": "repository_index",
    "RepositoryModelLoad": "repository_load",
    "RepositoryModelUnload": "repository_unload",
}

log = logging.getLogger(__name__)


def _version(text: str, field: str = "model_version") -> int | None:
    """A V2 version string ("" = the server's choice) as the engine's int version."""
    return validation.parse_version(text, field) if text else None


def _tensor_metadata(
    tensors: list[metadata.TensorMetadata],
) -> list[v2.ModelMetadataResponse.TensorMetadata]:
    return [
        v2.ModelMetadataResponse.TensorMetadata(name=t.name, datatype=t.datatype, shape=t.shape)
        for t in tensors
    ]


class InferenceServicer(
    EngineServicer, grpc_service_pb2_grpc.GRPCInferenceServiceServicer, wire="v2-grpc", padded=True
):
    """inference.GRPCInferenceService on the engine: server and model metadata, readiness,
    inference (one call, or a stream of them) and the model repository extension."""

    ENDPOINTS: ClassVar[dict[str, str]] = RPC_ENDPOINTS
    RAW_METHODS: ClassVar[frozenset[str]] = frozenset({"ModelInfer"})

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
        async def call(observed: Observed) -> v2.ModelReadyResponse:
            version = _version(request.version, "version")
            try:
                ready = metadata.model_ready(self.engine, request.name, version)
            except errors.NotFound:
                # NOTE: an answer (ready: false, as Triton's), yet made-up names and versions
                # must not become label values: counted as for a refusal.
                return v2.ModelReadyResponse(ready=False)
            observed.version = version
            return v2.ModelReadyResponse(ready=ready)

        model = request.name if self.calls.known(request.name) else ""
        return await self.calls.run_observed(context, model, "model_ready", call)

    async def ServerMetadata(  # noqa: N802
        self, request: v2.ServerMetadataRequest, context: Context
    ) -> v2.ServerMetadataResponse:
        return v2.ServerMetadataResponse(
            name=SERVER_NAME,
            version=server_version(),
            extensions=["model_repository"],
        )

    async def ModelMetadata(  # noqa: N802
        self, request: v2.ModelMetadataRequest, context: Context
    ) -> v2.ModelMetadataResponse:
        async def call(observed: Observed) -> v2.ModelMetadataResponse:
            asked = _version(request.version, "version")
            version, config = self.engine.model_config(request.name, asked)
            observed.version = version
            parameters = metadata.precision_parameters(self.engine, request.name, version)
            return v2.ModelMetadataResponse(
                name=request.name,
                versions=metadata.ready_versions(self.engine, request.name) or [str(version)],
                platform=SERVER_NAME,
                inputs=_tensor_metadata(metadata.input_metadata(config)),
                outputs=_tensor_metadata(metadata.output_metadata(config)),
                parameters={k: v2.InferParameter(string_param=v) for k, v in parameters.items()},
            )

        return await self.calls.run_observed(context, request.name, "model_metadata", call)

    async def infer_outputs(
        self, request: v2.ModelInferRequest, deadline_s: float | None
    ) -> tuple[int, list[V2Output]]:
        """One infer request: the model first (an unknown model's tensors are never decoded),
        then the protocol's request and the engine; the version that answered and the requested
        outputs."""
        version, config = self.engine.infer_config(
            request.model_name, _version(request.model_version)
        )
        core = requests.infer_request(
            request.model_name,
            version,
            config,
            convert.decode_v2_inputs(request),
            convert.plain_parameters(request.parameters),
            limit=self.settings.max_sequences_per_request,
            deadline_s=deadline_s,
            answer_limit=self.answers,
        )
        answered, outputs = await requests.infer(self.engine, core, config)
        return answered, requests.requested_outputs(outputs, [o.name for o in request.outputs])

    async def infer(
        self, request: v2.ModelInferRequest, deadline_s: float | None
    ) -> v2.ModelInferResponse:
        """`infer_outputs` as a response message (outputs as raw contents)."""
        answered, outputs = await self.infer_outputs(request, deadline_s)
        return convert.v2_infer_response(request, answered, outputs)

    async def ModelInfer(self, data: bytes, context: Context) -> bytes | None:  # noqa: N802
        """A ModelInferRequest's bytes in, the ModelInferResponse's bytes out (raw_messages.py);
        None once the call ends with an error status."""
        try:
            with self.calls.observe("", None, "infer") as observed:
                request = parse_request(v2.ModelInferRequest, data, self.limits)
                observed.model = request.model_name
                answered, outputs = await self.infer_outputs(request, deadline_of(context))
                observed.version = answered
                answer = raw_messages.infer_response(
                    request.model_name, answered, request.id, outputs
                )
                self.calls.check_answer(answer)
                return answer
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            end_call(context, exc)
            return None

    async def ModelStreamInfer(  # noqa: N802
        self, request_iterator: AsyncIterable[v2.ModelInferRequest], context: Context
    ) -> AsyncIterator[v2.ModelStreamInferResponse]:
        stream = _InferStream(self, context)
        async for answer in stream.serve(request_iterator):
            yield answer

    async def RepositoryIndex(  # noqa: N802
        self, request: v2.RepositoryIndexRequest, context: Context
    ) -> v2.RepositoryIndexResponse:
        async def call() -> v2.RepositoryIndexResponse:
            check_management(self.settings, context)
            index = v2.RepositoryIndexResponse()
            for model, v in metadata.repository_index(self.engine, request.ready):
                index.models.add(
                    name=model, version=str(v.version), state=v.state, reason=v.reason or ""
                )
            return index

        return await self.calls.run(context, "", "repository_index", call)

    async def RepositoryModelLoad(  # noqa: N802
        self, request: v2.RepositoryModelLoadRequest, context: Context
    ) -> v2.RepositoryModelLoadResponse:
        async def load(name: str) -> None:
            await metadata.repository_load(self.engine, name)

        await self._repository_action(context, request, "repository_load", load)
        return v2.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(  # noqa: N802
        self, request: v2.RepositoryModelUnloadRequest, context: Context
    ) -> v2.RepositoryModelUnloadResponse:
        await self._repository_action(context, request, "repository_unload", self.engine.unload)
        return v2.RepositoryModelUnloadResponse()

    async def _repository_action(
        self,
        context: Context,
        request: v2.RepositoryModelLoadRequest | v2.RepositoryModelUnloadRequest,
        endpoint: str,
        action: Callable[[str], Awaitable[None]],
    ) -> None:
        """A repository load or unload: the management rule, a repository name, parameters
        that ask for nothing else (as over HTTP), then `action`."""

        async def call() -> None:
            check_management(self.settings, context)
            validation.check_model_name(request.model_name, "model_name")
            parameters = convert.plain_parameters(request.parameters, keep_unset=True)
            management.check_repository_parameters(parameters)
            await action(request.model_name)

        await self.calls.run(context, request.model_name, endpoint, call)


class _InferStream:
    """One ModelStreamInfer call. Requests run concurrently (so they can share batches); answers
    go out in order of completion, and a failed request answers with `error_message` instead of
    failing the stream, as Triton does."""

    def __init__(self, servicer: InferenceServicer, context: Context) -> None:
        self.servicer = servicer
        self.calls = servicer.calls
        self.context = context
        self.answers: asyncio.Queue[v2.ModelStreamInferResponse | None] = asyncio.Queue()
        self.running: set[asyncio.Task[None]] = set()
        # NOTE: one permit per request read, given back once its answer went out: a client that
        # stops reading stops the stream reading its requests (HTTP/2 flow control then holds
        # its sends), instead of the server running and keeping answers without bound.
        self.pending = asyncio.Semaphore(servicer.settings.max_stream_pending)
        self.drained: errors.Draining | None = None

    async def serve(
        self, request_iterator: AsyncIterable[v2.ModelInferRequest]
    ) -> AsyncIterator[v2.ModelStreamInferResponse]:
        """The answers, as they are ready; then UNAVAILABLE if the server began to drain."""
        reader = asyncio.get_running_loop().create_task(self.read(request_iterator))
        try:
            while (answer := await self.answers.get()) is not None:
                yield answer
                self.pending.release()
            await reader
        finally:
            for task in (reader, *self.running):
                task.cancel()
        if self.drained is not None:
            await abort_with(self.context, self.drained)

    async def read(self, request_iterator: AsyncIterable[v2.ModelInferRequest]) -> None:
        """Read requests (one permit each) and start each one; the end of the answers last."""
        messages = aiter(request_iterator)
        watch = DrainWatch(self.servicer.engine.until_draining)
        try:
            while True:
                await self.pending.acquire()
                try:
                    request = await watch.read(messages)
                except errors.Draining as exc:
                    # NOTE: requests under way are answered, then the stream ends UNAVAILABLE.
                    self.drained = exc
                    break
                except errors.InvalidInput as exc:
                    # NOTE: a message that does not parse (calls.ParsedRequests) is answered
                    # inline like any failed request, and the stream reads on.
                    self.calls.requests.record("", None, "stream_infer", exc, 0.0)
                    await self.fail(v2.ModelInferRequest(), exc.message)
                    continue
                if request is None:
                    break
                task = asyncio.get_running_loop().create_task(self.one(request))
                self.running.add(task)
                task.add_done_callback(self.running.discard)
            await asyncio.gather(*self.running)
        finally:
            watch.close()
            # NOTE: always, so the writer never waits for answers that cannot come.
            self.answers.put_nowait(None)

    async def one(self, request: v2.ModelInferRequest) -> None:
        """Answer one request of the stream, its failure included."""
        try:
            with self.calls.observe(request.model_name, None, "stream_infer") as observed:
                response = await self.servicer.infer(request, deadline_of(self.context))
                self.calls.check_answer(response)
                observed.version = int(response.model_version)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if isinstance(exc, errors.ServiceError):
                message = exc.message
            else:
                log.exception("unexpected error in ModelStreamInfer", exc_info=exc)
                message = "internal error (see the server log)"
            await self.fail(request, message)
            return
        await self.answers.put(v2.ModelStreamInferResponse(infer_response=response))

    async def fail(self, request: v2.ModelInferRequest, message: str) -> None:
        """Answer `request` with an error message (the stream goes on)."""
        failed = v2.ModelInferResponse(
            model_name=request.model_name, model_version=request.model_version, id=request.id
        )
        await self.answers.put(
            v2.ModelStreamInferResponse(error_message=message, infer_response=failed)
        )
