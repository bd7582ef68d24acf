"""`Engine`: the typed, transport-free API that both front-ends (REST, gRPC) call.

    engine = Engine(settings, metrics)       # no asyncio objects created here
    await engine.start()                     # in the running loop: device, threads, models
    result = await engine.encode(EncodeRequest(model="tagger", sequences=[...], kind="features"))
    result = await engine.generate(GenerateRequest(model="tr", sequences=["abc"], kind="text"))
    async for event in engine.generate_stream(request): ...   # TokenEvent…, then GenerateResult
    engine.list_models(); engine.model_info(name); engine.model_config(name)
    await engine.load(name); await engine.unload(name); await engine.reload(name)
    engine.live; engine.ready; engine.draining; await engine.drain(grace_s)
    await engine.until_draining()            # streams: returns once a drain has begun

Every request is validated here (`service.core.validation`) before it joins a batch; errors are
the classes of `service.core.errors`. Front-ends observe each request once
(`service.core.request_metrics`); the engine records everything below that (queue, batches,
compute, in-flight, model state).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncGenerator, Callable
from typing import Any, TypeVar

import numpy as np
import torch

from models.config import ModelConfig
from service.core import limits, validation
from service.core.decode_scheduler import Job
from service.core.encode_batcher import Item, Row
from service.core.errors import DeadlineExceeded, Draining, InvalidInput, ServiceError
from service.core.executor import DeviceExecutor
from service.core.metrics import Metrics
from service.core.registry import ModelVersion, Registry
from service.core.sessions import SessionManager
from service.core.settings import Settings
from service.core.types import (
    ChunkOutput,
    ChunkRequest,
    EncodeRequest,
    EncodeResult,
    GeneratedSequence,
    GenerateRequest,
    GenerateResult,
    Head,
    InputKind,
    ModelInfo,
    SequenceData,
    TokenEvent,
)

log = logging.getLogger(__name__)

T = TypeVar("T")


class Engine:
    """The serving core: registry, batchers, decode schedulers, one executor per device."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.device = settings.torch_device()
        self.dtype = settings.torch_dtype()
        cores = os.cpu_count() or 1
        self.cpu_threads = settings.intra_op_threads(cores)
        threads = self.cpu_threads if self.device.type == "cpu" else None
        self.executor = DeviceExecutor(self.device, threads)
        # NOTE: seq2seq newcomers are encoded here while the device thread keeps decoding.
        self.prefill = DeviceExecutor(self.device, threads, name="prefill")
        self.registry = Registry(settings, metrics, self.executor, self.prefill, self.dtype)
        self.required: list[str] = []
        # False when a drain ended with a model call still running on a compute thread.
        self.threads_done = True
        self._started = False
        self._draining = False
        self._inflight = 0
        self._inflight_gauges: dict[str, Any] = {}  # model → its in-flight gauge child
        self._idle: asyncio.Event | None = None
        self._drain_started: asyncio.Event | None = None
        # Streaming sessions (service/core/sessions.py); the engine is their StreamBackend.
        self.sessions = SessionManager.from_settings(self, settings, metrics)

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the device thread and load the configured models (failures are reported, not
        raised); a missing repository folder raises ValueError."""
        if self.device.type == "cpu":
            torch.set_num_threads(self.cpu_threads)
        if not self.registry.repository.is_dir():
            raise ValueError(f"model repository {self.registry.repository} is not a folder")
        self.executor.start()
        self.prefill.start()
        self._idle = asyncio.Event()
        await self.sessions.start()
        names = self.settings.models or sorted(self.registry.scan())
        self.required = list(names)
        log.info(
            "engine starting on %s (%s, %s intra-op threads): models %s",
            self.device,
            self.settings.dtype,
            self.cpu_threads if self.device.type == "cpu" else "-",
            ", ".join(names) or "none",
        )
        results = await asyncio.gather(
            *(self.registry.load(name) for name in names), return_exceptions=True
        )
        for name, result in zip(names, results, strict=True):
            if isinstance(result, BaseException):
                log.error("model %s is not serving: %s", name, result)
        self._started = True

    @property
    def live(self) -> bool:
        """The process answers (never depends on models)."""
        return True

    @property
    def draining(self) -> bool:
        """True once `drain` began: no new work is admitted."""
        return self._draining

    @property
    def ready(self) -> bool:
        """Takes traffic: started, not draining, and every required model READY (strict) or
        at least one model READY (relaxed)."""
        if not self._started or self._draining:
            return False
        ready = self.registry.ready_names()
        if self.settings.strict_readiness:
            return all(name in ready for name in self.required)
        return bool(ready)

    async def drain(self, grace_s: float | None = None) -> None:
        """Refuse new work at once; let admitted work finish until the grace (less a reserve to
        stop in, `stop_reserve_s`) ends, then fail what is left with `Draining` (503 /
        UNAVAILABLE); close sessions, unload every model, stop the compute threads. Returns
        within `grace_s`, whatever still runs on the device (see `threads_done`)."""
        self._draining = True
        if self._drain_started is not None:
            self._drain_started.set()
        grace = self.settings.drain_grace_s if grace_s is None else grace_s
        loop = asyncio.get_running_loop()
        started = loop.time()
        deadline = started + grace - stop_reserve_s(grace)
        if self._idle is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout_at(deadline):
                    while self._inflight:
                        self._idle.clear()
                        await self._idle.wait()
        if self._inflight:
            log.warning(
                "drain: %d requests still running after %.1f s: they are answered as the "
                "server shutting down",
                self._inflight,
                loop.time() - started,
            )
        await self.registry.close(deadline)
        await self.sessions.stop()
        # NOTE: a model call cannot be interrupted: the threads get a moment to end, and the
        # process may exit with one still computing (service/process/serve.py).
        wait_s = min(0.1, max(0.0, started + grace - stop_reserve_s(grace) / 2 - loop.time()))
        self.threads_done = all(
            await asyncio.gather(
                asyncio.to_thread(self.executor.shutdown, wait_s),
                asyncio.to_thread(self.prefill.shutdown, wait_s),
            )
        )
        log.info("engine drained")

    async def until_draining(self) -> None:
        """Return once a drain has begun (streams stop waiting for their client then)."""
        if self._drain_started is None:
            self._drain_started = asyncio.Event()
            if self._draining:
                self._drain_started.set()
        await self._drain_started.wait()

    # -- models ----------------------------------------------------------------------------

    def list_models(self) -> list[ModelInfo]:
        """Every known model (serving, loading or failed) with versions and states."""
        return [self.registry.model_info(name) for name in self.registry.names()]

    def model_info(self, name: str, version: int | None = None) -> ModelInfo:
        """Versions, states (with failure reasons) and architecture of one model."""
        return self.registry.model_info(name, version)

    def knows(self, name: str, version: int | None = None) -> bool:
        """Whether the server knows model `name` (and that version of it, unless None): loaded,
        loading or failed. Request metrics label only known names."""
        try:
            self.registry.model_info(name, version)
        except ServiceError:
            return False
        return True

    def model_config(self, name: str, version: int | None = None) -> tuple[int, ModelConfig]:
        """The READY version's number and its config (NotFound / NotReady otherwise)."""
        entry = self.registry.resolve(name, version)
        return entry.version, entry.config

    def infer_config(self, name: str, version: int | None = None) -> tuple[int, ModelConfig]:
        """`model_config` for a request about to run: `Draining` first once the server drains
        (a model may be unloaded by then, and the client must hear why)."""
        self._check_admitting()
        return self.model_config(name, version)

    def model_head(self, name: str, version: int) -> Head | None:
        """A READY version's linear head as numpy arrays (None without a head), copied from the
        device when the version loaded (sessions ask for it every chunk)."""
        return self.registry.resolve(name, version).head

    async def load(self, name: str, version: int | None = None) -> None:
        """Load a model (its policy's versions) or one version, beside what serves."""
        self._check_admitting()
        await self.registry.load(name, version)

    async def unload(self, name: str, version: int | None = None) -> None:
        """Drain and unload a model or one version."""
        await self.registry.unload(name, version)

    async def reload(self, name: str) -> None:
        """Rebuild from disk and swap atomically; in-flight requests finish on the old build."""
        self._check_admitting()
        await self.registry.reload(name)

    # -- encode ----------------------------------------------------------------------------

    async def encode(self, request: EncodeRequest) -> EncodeResult:
        """Encode every sequence of the request (batched with other requests)."""
        self._check_admitting()
        entry = self.registry.resolve(request.model, request.version)
        config = entry.config
        validation.check_task(request.model, config, "encode")
        validation.check_pooling(request.pooling)
        timeout = self._timeout(request.timeout_s)
        arrays = self._sequences(entry, request.kind, request.sequences)
        if request.answer_limit is not None:
            limits.check_answer_size(
                config,
                request.kind,
                arrays,
                request.pooling or config.pooling,
                request.answer_limit,
            )
        deadline = None if timeout is None else time.monotonic() + timeout
        loop = asyncio.get_running_loop()
        items = [Item(a, loop.create_future(), request.pooling, deadline) for a in arrays]
        assert entry.batcher is not None
        entry.batcher.submit(items)
        rows: list[Row] = await self._wait(
            request.model, [i.future for i in items], timeout, entry.batcher.purge
        )
        pooling = request.pooling or config.pooling
        encodings: np.ndarray | list[np.ndarray]
        if pooling == "none":
            encodings = [row.encoding for row in rows]
        else:
            # NOTE: np.array stacks equal shapes in C; np.stack runs Python per row.
            encodings = np.array([row.encoding for row in rows])
        scores = None
        labels = None
        if config.head is not None:
            scores = np.array([row.scores for row in rows if row.scores is not None])
            if config.head.labels is not None:
                labels = [config.head.labels[int(i)] for i in scores.argmax(axis=1)]
        return EncodeResult(request.model, entry.version, encodings, scores, labels)

    async def encode_chunk(self, request: ChunkRequest) -> ChunkOutput:
        """One chunk of a streamed sequence from its initial state, batched with everything
        else; returns every step's top-layer output and the row's final state."""
        self._check_admitting()
        model = request.model
        entry = self.registry.resolve(model, request.version)
        validation.check_task(model, entry.config, "encode")
        timeout = self._timeout(request.timeout_s)
        try:
            (array,) = self._sequences(entry, request.kind, [request.sequence])
        except InvalidInput as exc:
            raise _chunk_error(exc) from None
        deadline = None if timeout is None else time.monotonic() + timeout
        future: asyncio.Future[Row] = asyncio.get_running_loop().create_future()
        item = Item(array, future, "none", deadline, request.initial_state, return_state=True)
        assert entry.batcher is not None
        entry.batcher.submit([item])
        (row,) = await self._wait(model, [future], timeout, entry.batcher.purge)
        assert row.final_state is not None
        return ChunkOutput(version=entry.version, outputs=row.encoding, final_state=row.final_state)

    # -- generate --------------------------------------------------------------------------

    async def generate(self, request: GenerateRequest) -> GenerateResult:
        """Decode an output for every input sequence (continuous batching across requests)."""
        entry, jobs, timeout = self._generate_jobs(request, None)
        tokens: list[list[int]] = await self._wait(
            request.model, [job.future for job in jobs], timeout
        )
        return self._generate_result(request, entry, tokens)

    async def generate_stream(
        self, request: GenerateRequest
    ) -> AsyncGenerator[TokenEvent | GenerateResult, None]:
        """TokenEvents as tokens are chosen (greedy only; beam search emits none), then the
        GenerateResult. Validation and admission errors raise at the first iteration."""
        events: asyncio.Queue[TokenEvent | None] = asyncio.Queue()
        entry, jobs, timeout = self._generate_jobs(request, events)
        for job in jobs:
            job.future.add_done_callback(lambda _: events.put_nowait(None))
        gauge = self._enter(request.model)
        try:
            remaining = len(jobs)
            deadline = None if timeout is None else time.monotonic() + timeout
            while remaining:
                event = await events.get() if deadline is None else await _get(events, deadline)
                if event is None:
                    remaining -= 1
                else:
                    yield event
            tokens = [job.future.result() for job in jobs]
        finally:
            for job in jobs:
                if not job.future.done():
                    job.future.cancel()
                elif not job.future.cancelled():
                    # NOTE: once one job's error is raised, the others' are read here, or asyncio
                    # logs each as "exception was never retrieved".
                    job.future.exception()
            self._leave(gauge)
        yield self._generate_result(request, entry, tokens)

    def _generate_jobs(
        self, request: GenerateRequest, events: asyncio.Queue[TokenEvent | None] | None
    ) -> tuple[ModelVersion, list[Job], float | None]:
        self._check_admitting()
        entry = self.registry.resolve(request.model, request.version)
        config = entry.config
        validation.check_task(request.model, config, "seq2seq")
        limit = validation.generate_limits(
            config,
            request.beam_size,
            request.max_length,
            min(self.settings.max_beam_size, self.settings.request_decode_slots()),
        )
        timeout = self._timeout(request.timeout_s)
        arrays = self._sequences(entry, request.kind, request.sequences)
        deadline = None if timeout is None else time.monotonic() + timeout
        loop = asyncio.get_running_loop()
        tokenizer = entry.loaded.output_tokenizer if entry.loaded is not None else None
        jobs: list[Job] = []
        for index, array in enumerate(arrays):
            on_token = None
            if events is not None and request.beam_size == 1:
                on_token = _token_sink(events, index, tokenizer)
            jobs.append(
                Job(array, loop.create_future(), limit, request.beam_size, deadline, on_token)
            )
        assert entry.decoder is not None
        entry.decoder.submit(jobs)
        return entry, jobs, timeout

    def _generate_result(
        self, request: GenerateRequest, entry: ModelVersion, tokens: list[list[int]]
    ) -> GenerateResult:
        tokenizer = entry.loaded.output_tokenizer if entry.loaded is not None else None
        outputs = [
            GeneratedSequence(list(t), tokenizer.decode(t) if tokenizer is not None else None)
            for t in tokens
        ]
        return GenerateResult(request.model, entry.version, outputs)

    # -- shared ----------------------------------------------------------------------------

    def _check_admitting(self) -> None:
        if self._draining:
            raise Draining("the server is shutting down and admits no new requests")

    def _timeout(self, timeout_s: float | None) -> float | None:
        limits.check_timeout(timeout_s)
        return timeout_s if timeout_s is not None else self.settings.default_timeout_s

    def _sequences(
        self, entry: ModelVersion, kind: InputKind, items: list[SequenceData]
    ) -> list[np.ndarray]:
        assert entry.loaded is not None
        return validation.sequences(
            entry.config,
            entry.loaded.input_tokenizer,
            kind,
            items,
            max_sequences=self.settings.max_sequences_per_request,
            max_text_length=self.settings.max_text_length,
        )

    def _enter(self, model: str) -> Any:
        self._inflight += 1
        gauge = self._inflight_gauges.get(model)
        if gauge is None:
            gauge = self._inflight_gauges[model] = self.metrics.inflight_requests.labels(model)
        gauge.inc()
        return gauge

    def _leave(self, gauge: Any) -> None:
        self._inflight -= 1
        gauge.dec()
        if self._inflight == 0 and self._idle is not None:
            self._idle.set()

    async def _wait(
        self,
        model: str,
        futures: list[asyncio.Future[T]],
        timeout_s: float | None,
        on_abandon: Callable[[], None] | None = None,
    ) -> list[T]:
        """Results of `futures` in order; on error, timeout or cancellation the rest are
        cancelled (a cancelled item is never computed)."""
        gauge = self._enter(model)
        try:
            if timeout_s is None:
                return [await future for future in futures]
            try:
                async with asyncio.timeout(timeout_s):
                    return [await future for future in futures]
            except TimeoutError:
                raise DeadlineExceeded(
                    f"model {model}: no result within the deadline of {timeout_s * 1000:g} ms"
                ) from None
        finally:
            abandoned = [future for future in futures if not future.done()]
            for future in abandoned:
                future.cancel()
            for future in futures:
                # NOTE: a batch's error reaches each of its rows' futures; once the first is
                # raised the others' are read here, or asyncio logs each as never retrieved.
                if not future.cancelled():
                    future.exception()
            if abandoned and on_abandon is not None:
                on_abandon()
            self._leave(gauge)


def stop_reserve_s(grace_s: float) -> float:
    """The part of a drain grace kept to stop in (fail what is left, unload, stop the servers,
    exit) after admitted work had its time: half of it, at most 1 s (uvicorn alone takes
    0.2–0.3 s to stop: it polls every 0.1 s)."""
    return min(1.0, grace_s / 2)


def _token_sink(
    events: asyncio.Queue[TokenEvent | None], index: int, tokenizer: object | None
) -> Callable[[int], None]:
    decode = getattr(tokenizer, "decode", None)

    def sink(token: int) -> None:
        text = decode([token]) if decode is not None else None
        events.put_nowait(TokenEvent(index, token, text))

    return sink


async def _get(events: asyncio.Queue[TokenEvent | None], deadline: float) -> TokenEvent | None:
    remaining = deadline - time.monotonic()
    try:
        async with asyncio.timeout(max(0.0, remaining)):
            return await events.get()
    except TimeoutError:
        raise DeadlineExceeded("no result within the request's deadline") from None


def _chunk_error(exc: InvalidInput) -> InvalidInput:
    """Name a chunk's fields as sent (`inputs`, `tokens`, `text`: one sequence), not `texts[0]`."""
    if type(exc) is not InvalidInput:
        return exc
    message = str(exc)[len(exc.field) + 2 :].replace("'texts'", "'text'")
    for batch, chunk in (("inputs", "inputs"), ("tokens", "tokens"), ("texts", "text")):
        if exc.field == batch or exc.field.startswith(batch + "["):
            rest = exc.field[len(batch) :]
            return InvalidInput(chunk + rest.removeprefix("[0]"), message)
    return InvalidInput(exc.field, message)
