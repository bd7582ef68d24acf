"""The decode scheduler: continuous batching of seq2seq decoding, one step at a time.

One per seq2seq model version. Every step is one model call over all running rows (any mix of
requests, source lengths, greedy rows and beams):
- waiting requests are encoded and join the running batch between steps: at once when nothing
  runs, else grouped (when they number `join_fraction` of the running requests, or the oldest
  has waited `max_wait_steps` steps), since encoding one costs about as much as encoding many;
- a row leaves at once when its request is done (<eos>, max_length), cancelled (client gone) or
  past its deadline, so a long output never holds short ones hostage;
- greedy decoding streams each token as it is chosen (`Job.on_token`); beam search reorders its
  rows with `models.decoding.BeamSearch` each step and hands out only its final best tokens.
Slots: a greedy request uses one row, a beam request reserves `beam_size` rows; at most
`max_slots` rows run together (`rnnserve_decode_slots_in_use`). The computation is the same as
`Seq2SeqModel.generate` (same `step`, same `BeamSearch`), so outputs equal offline decoding.
Steps run in bursts on the device thread (one executor call per burst, not per step); each
step's results go back to the loop at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from models.decoding import BeamSearch
from models.seq2seq import DecoderState, Seq2SeqModel
from service.errors import ComputeError, DeadlineExceeded, Draining, Overloaded, ServiceError
from service.executor import DeviceExecutor
from service.metrics import Metrics

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Job:
    """One source sequence to decode; `future` gets its tokens (<bos>/<eos> excluded)."""

    source: np.ndarray  # int64 [S] or float32 [S, F]
    future: asyncio.Future[list[int]]
    max_length: int
    beam_size: int = 1
    deadline: float | None = None  # time.monotonic() seconds
    on_token: Callable[[int], None] | None = None  # greedy only: called with each new token
    enqueued: float = field(default_factory=time.monotonic)
    tokens: list[int] = field(default_factory=list)
    search: BeamSearch | None = None
    rows: int = 0  # rows of this job in the running batch

    @property
    def dead(self) -> bool:
        return self.future.done()


class DecodeScheduler:
    """Runs the decode batch of one seq2seq model version on the device executor."""

    def __init__(
        self,
        model: str,
        version: int,
        network: Seq2SeqModel,
        executor: DeviceExecutor,
        metrics: Metrics,
        *,
        max_slots: int,
        max_queue: int,
        max_batch_size: int,
        join_fraction: float = 0.25,
        max_wait_steps: int = 8,
        max_burst: int = 16,
    ) -> None:
        self.model = model
        self.version = version
        self.max_slots = max_slots
        self.max_queue = max_queue
        self.max_admit = max_batch_size
        self.join_fraction = join_fraction
        self.max_wait_steps = max_wait_steps
        self._steps_waited = 0
        self.max_burst = max_burst
        self._feed: list[int] = []  # the token each running row reads at the next step
        parameter = next(network.parameters())
        self._device = parameter.device
        self._dtype = parameter.dtype
        labels = (model, str(version))
        self._m_compute = metrics.compute_duration.labels(*labels, "decode")
        self._m_rows = metrics.batch_size.labels(*labels, "decode")
        self._m_calls = metrics.model_calls_total.labels(*labels, "decode")
        self._m_queue = metrics.queue_duration.labels(*labels)
        self._m_dropped_cancelled = metrics.dropped_total.labels(*labels, "cancelled")
        self._m_dropped_deadline = metrics.dropped_total.labels(*labels, "deadline")
        self._m_depth = metrics.queue_depth.labels(*labels, "decode")
        self._m_slots = metrics.decode_slots_in_use.labels(*labels)
        self._network = network
        self._spec = network.decoder_spec
        self._executor = executor
        self._waiting: deque[Job] = deque()
        self._running: list[Job] = []  # in row order
        self._state: DecoderState | None = None
        self._closed = False
        self._step_seconds = 0.005
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Create the asyncio objects and the scheduling task (inside the running loop)."""
        self._wakeup = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(
            self._run(), name=f"decoder-{self.model}-{self.version}"
        )
        self._task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        # NOTE: the scheduling task only ends by cancellation; if a bug ends it, fail every job
        # (and refuse more) rather than leave callers waiting forever.
        if task.cancelled() or task.exception() is None:
            return
        log.error(
            "model %s version %s: decoder stopped: %r", self.model, self.version, task.exception()
        )
        self._closed = True
        error = ComputeError(f"model {self.model} version {self.version}: internal error")
        for job in [*self._waiting, *self._running]:
            if not job.future.done():
                job.future.set_exception(error)
        self._waiting.clear()
        self._running = []

    @property
    def slots_in_use(self) -> int:
        """Rows reserved by running requests."""
        return sum(job.beam_size for job in self._running)

    @property
    def queue_depth(self) -> int:
        """Sequences waiting for a slot."""
        return len(self._waiting)

    async def warm_up(self, source: np.ndarray) -> None:
        """Encode one short sequence and run one step on the device (outside any metric)."""
        network = self._network

        def warm() -> None:
            inputs = torch.from_numpy(source)[None].to(self._device)
            if inputs.is_floating_point():
                inputs = inputs.to(self._dtype)
            state = network.encode(inputs, torch.tensor([source.shape[0]]))
            network.step(state, torch.tensor([self._spec.bos_id], device=self._device))

        await self._executor.run(warm)

    async def drain(self) -> None:
        """Stop admitting; finish every admitted job; then stop the task."""
        self._closed = True
        while self._waiting or self._running:
            if self._wakeup is not None:
                self._wakeup.set()
            await asyncio.sleep(0.001)
        await self.stop()

    async def stop(self) -> None:
        """Stop at once: waiting and running jobs fail with `Draining`."""
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        error = Draining(f"model {self.model} version {self.version} is unloading")
        for job in [*self._waiting, *self._running]:
            if not job.future.done():
                job.future.set_exception(error)
        self._waiting.clear()
        self._running.clear()
        self._state = None
        self._feed = []
        self._gauges()

    # -- admission -------------------------------------------------------------------------

    def submit(self, jobs: list[Job]) -> None:
        """Admit all of `jobs` or none: `Overloaded` when the waiting queue cannot take them."""
        if self._closed:
            raise Draining(f"model {self.model} version {self.version} is not taking requests")
        if len(self._waiting) + len(jobs) > self.max_queue:
            raise Overloaded(
                f"model {self.model} version {self.version}: decode queue full "
                f"({len(self._waiting)} of {self.max_queue} sequences waiting)",
                retry_after_s=round(max(0.05, self._step_seconds * self._spec.max_length), 3),
            )
        for job in jobs:
            if job.beam_size > self.max_slots:
                raise Overloaded(
                    f"beam_size {job.beam_size} exceeds the {self.max_slots} decode slots"
                )
        self._waiting.extend(jobs)
        self._gauges()
        assert self._wakeup is not None
        self._wakeup.set()

    def _gauges(self) -> None:
        self._m_depth.set(len(self._waiting))
        self._m_slots.set(self.slots_in_use)

    # -- the scheduling task ---------------------------------------------------------------

    async def _run(self) -> None:
        assert self._wakeup is not None
        while True:
            if not self._running and not self._waiting:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            admitted = self._admit()
            if not self._running:
                # NOTE: only dead jobs were waiting; nothing to compute.
                self._gauges()
                continue
            loop = asyncio.get_running_loop()
            try:
                steps, _ = await self._executor.run(self._burst, loop, admitted)
            except Exception as exc:
                self._fail_running(exc)
                continue
            for rows, seconds in steps:
                self._step_seconds = 0.8 * self._step_seconds + 0.2 * seconds
                self._m_compute.observe(seconds)
                self._m_rows.observe(rows)
                self._m_calls.inc()
            self._gauges()
            # NOTE: a loop turn lets finished callers submit again before the next burst.
            await asyncio.sleep(0)

    def _should_admit(self) -> bool:
        # NOTE: encoding newcomers and joining their state costs about as much for one row as
        # for many, so joins are grouped (as TGI's waiting_served_ratio / max_waiting_tokens):
        # at once when idle, else when enough wait or the oldest has waited max_wait_steps.
        if not self._waiting:
            return False
        if not self._running:
            return True
        if self.slots_in_use + self._waiting[0].beam_size > self.max_slots:
            return False  # the next one does not fit until rows leave
        if self._steps_waited >= self.max_wait_steps:
            return True
        return len(self._waiting) >= max(1, int(len(self._running) * self.join_fraction))

    def _admit(self) -> list[Job]:
        if not self._should_admit():
            return []
        self._steps_waited = 0
        now = time.monotonic()
        admitted: list[Job] = []
        used = self.slots_in_use
        while self._waiting and len(admitted) < self.max_admit:
            job = self._waiting[0]
            # NOTE: deadline first: a waiter that gave up at its deadline also cancelled it.
            if job.deadline is not None and job.deadline <= now:
                self._waiting.popleft()
                self._expire(job, now)
                continue
            if job.dead:
                self._waiting.popleft()
                self._m_dropped_cancelled.inc()
                continue
            if used + job.beam_size > self.max_slots:
                break
            self._waiting.popleft()
            used += job.beam_size
            job.rows = 1
            if job.beam_size > 1:
                job.search = BeamSearch(job.beam_size, self._spec.eos_id, job.max_length)
            admitted.append(job)
            self._m_queue.observe(now - job.enqueued)
        self._running.extend(admitted)
        return admitted

    def _expire(self, job: Job, now: float) -> None:
        self._m_dropped_deadline.inc()
        if not job.future.done():
            job.future.set_exception(self._deadline_error(job, now))

    def _deadline_error(self, job: Job, now: float) -> DeadlineExceeded:
        return DeadlineExceeded(
            f"deadline passed after {now - job.enqueued:.3f} s decoding with model "
            f"{self.model} version {self.version} ({len(job.tokens)} tokens produced)"
        )

    # -- on the device thread ----------------------------------------------------------------

    def _burst(
        self, loop: asyncio.AbstractEventLoop, admitted: list[Job]
    ) -> list[tuple[int, float]]:
        """Encode newcomers, then run decode steps until a join is due, nothing runs, or
        max_burst steps; returns (rows, seconds) per step. Runs on the device thread.

        NOTE: while this runs the loop does not touch `_running` or `_state` (it awaits this
        call); results, tokens and errors go back with `loop.call_soon_threadsafe`.
        """
        network = self._network
        if admitted:
            sources = [job.source for job in admitted]
            lengths = torch.tensor([s.shape[0] for s in sources], dtype=torch.int64)
            padded = torch.nn.utils.rnn.pad_sequence(
                [torch.from_numpy(s) for s in sources], batch_first=True
            ).to(self._device)
            if padded.is_floating_point():
                padded = padded.to(self._dtype)
            fresh = network.encode(padded, lengths)
            self._state = fresh if self._state is None else DecoderState.cat([self._state, fresh])
            self._feed.extend([self._spec.bos_id] * len(admitted))
        steps: list[tuple[int, float]] = []
        while self._running and len(steps) < self.max_burst:
            start = time.perf_counter()
            assert self._state is not None
            feed = torch.tensor(self._feed, dtype=torch.int64, device=self._device)
            log_probs, state = network.step(self._state, feed)
            log_probs = log_probs.float().cpu()
            rows = log_probs.shape[0]
            keep = self._advance(loop, log_probs)
            if not self._running:
                self._state = None
            elif keep != list(range(rows)):
                self._state = state.select(torch.tensor(keep, dtype=torch.int64))
            else:
                self._state = state
            steps.append((rows, time.perf_counter() - start))
            if self._waiting:
                self._steps_waited += 1
                if self._should_admit():
                    break
        return steps

    def _advance(self, loop: asyncio.AbstractEventLoop, log_probs: Tensor) -> list[int]:
        """Apply one step to each running job; set `_feed`; return the rows to keep."""
        now = time.monotonic()
        best = log_probs.argmax(dim=-1).tolist()
        keep: list[int] = []
        feed: list[int] = []
        survivors: list[Job] = []
        emitted: list[tuple[Job, int]] = []
        offset = 0
        eos = self._spec.eos_id
        finished: list[tuple[Job, list[int]]] = []
        expired: list[Job] = []
        cancelled = 0
        for job in self._running:
            start, offset = offset, offset + job.rows
            if job.dead:  # NOTE: a read of a flag the loop may set; at worst one step late
                cancelled += 1
                continue
            if job.deadline is not None and job.deadline <= now:
                expired.append(job)
                continue
            if job.search is None:
                token = best[start]
                if token == eos:
                    finished.append((job, job.tokens))
                    continue
                job.tokens.append(token)
                if job.on_token is not None:
                    emitted.append((job, token))
                if len(job.tokens) >= job.max_length:
                    finished.append((job, job.tokens))
                    continue
                keep.append(start)
                feed.append(token)
            else:
                parents, chosen = job.search.step(log_probs[start:offset])
                if job.search.done:
                    finished.append((job, job.search.best()))
                    continue
                keep.extend((parents + start).tolist())
                feed.extend(chosen.tolist())
                job.rows = len(parents)
            survivors.append(job)
        if emitted or finished or expired or cancelled:
            # NOTE: one hand-over per step; tokens first, so a stream sees its last token
            # before its result.
            loop.call_soon_threadsafe(self._deliver, emitted, finished, expired, cancelled, now)
        self._running = survivors
        self._feed = feed
        return keep

    def _deliver(
        self,
        emitted: list[tuple[Job, int]],
        finished: list[tuple[Job, list[int]]],
        expired: list[Job],
        cancelled: int,
        now: float,
    ) -> None:
        """On the loop: stream tokens, set results, expire deadlines, count drops."""
        for job, token in emitted:
            if job.on_token is not None and not job.future.done():
                job.on_token(token)
        for job, tokens in finished:
            if not job.future.done():
                job.future.set_result(tokens)
        for job in expired:
            self._expire(job, now)
        if cancelled:
            self._m_dropped_cancelled.inc(cancelled)

    def _fail_running(self, exc: Exception) -> None:
        log.error(
            "model %s version %s: decode step failed: %s: %s",
            self.model,
            self.version,
            type(exc).__name__,
            exc,
        )
        error = (
            exc
            if isinstance(exc, ServiceError)
            else ComputeError(
                f"model {self.model} version {self.version} failed while decoding: "
                f"{type(exc).__name__}"
            )
        )
        for job in self._running:
            if not job.future.done():
                job.future.set_exception(error)
        self._running = []
        self._state = None
        self._feed = []
        self._gauges()
