"""The decode scheduler: continuous batching of seq2seq decoding, one step at a time.

One per seq2seq model version. Every step is one model call over all running rows (any mix of
requests, source lengths, greedy rows and beams):
- waiting requests are encoded together and join the running batch between steps. An encode
  starts when nothing runs, or when the waiting requests number `join_fraction` of the running
  ones, or the oldest has waited `max_wait_steps` steps (encoding one costs about as much as
  encoding many; the device thread wakes the loop at that step, mid-burst). The encode runs
  on the `prefill` executor (a second worker thread) while the running batch keeps stepping;
- a row leaves at once when its request is done (<eos>, max_length), cancelled (client gone) or
  past its deadline, so a long output never holds short ones hostage;
- greedy decoding streams each token as it is chosen (`Job.on_token`); beam search reorders its
  rows with `models.decoding.BeamSearch` each step and hands out only its final best tokens.
Slots: a greedy request uses one row, a beam request reserves `beam_size` rows from the moment
its encode starts; at most `max_slots` rows run together (`rnnserve_decode_slots_in_use`). The
computation is the same as `Seq2SeqModel.generate` (same `encode`, `step`, `BeamSearch`), so
outputs equal offline decoding. Steps run in bursts on the device thread (one executor call per
burst, not per step); encoded newcomers join inside a burst. Each step's results go back to the
loop at once. Per step the device thread copies only the chosen token ids to the host (and the
log-probs of beam rows); the next step's input stays on the device.
Threads: the loop owns the waiting queue and starts encodes; the device thread owns the running
batch; groups to join pass from one to the other through `_ready` (a deque). Slots reserved
(loop) and released (device thread) are two counters with one writer each.
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
from models.encoder import collate
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
    enqueued_step: int = 0  # the scheduler's step count when it was queued
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
        prefill: DeviceExecutor,
        metrics: Metrics,
        *,
        max_slots: int,
        max_queue: int,
        max_batch_size: int,
        join_fraction: float = 0.5,
        max_wait_steps: int = 16,
        max_burst: int = 16,
    ) -> None:
        self.model = model
        self.version = version
        self.max_slots = max_slots
        self.max_queue = max_queue
        self.max_admit = max_batch_size
        self.join_fraction = join_fraction
        self.max_wait_steps = max_wait_steps
        self.max_burst = max_burst
        parameter = next(network.parameters())
        self._device = parameter.device
        self._dtype = parameter.dtype
        labels = (model, str(version))
        self._m_compute = metrics.compute_duration.labels(*labels, "decode")
        self._m_rows = metrics.batch_size.labels(*labels, "decode")
        self._m_calls = metrics.model_calls_total.labels(*labels, "decode")
        self._m_encode_compute = metrics.compute_duration.labels(*labels, "encode")
        self._m_encode_rows = metrics.batch_size.labels(*labels, "encode")
        self._m_encode_calls = metrics.model_calls_total.labels(*labels, "encode")
        self._m_queue = metrics.queue_duration.labels(*labels)
        self._m_dropped_cancelled = metrics.dropped_total.labels(*labels, "cancelled")
        self._m_dropped_deadline = metrics.dropped_total.labels(*labels, "deadline")
        self._m_depth = metrics.queue_depth.labels(*labels, "decode")
        self._m_slots = metrics.decode_slots_in_use.labels(*labels)
        self._network = network
        self._spec = network.decoder_spec
        self._executor = executor
        self._prefill = prefill
        # On the loop: jobs waiting for an encode, jobs being encoded, slots reserved so far.
        self._waiting: deque[Job] = deque()
        self._encoding: list[Job] = []
        self._reserved = 0
        # Encoded groups to join: (jobs, their decoder state, their first input). The loop
        # appends, the device thread takes.
        self._ready: deque[tuple[list[Job], DecoderState, Tensor]] = deque()
        # On the device thread: the running batch, slots released, steps run.
        self._running: list[Job] = []  # in row order
        self._released = 0
        self._beams = 0  # beam-search jobs in `_running`: they need host log-probs
        self._steps = 0
        # The step at which the oldest waiting request has waited max_wait_steps (written by the
        # loop), and the last such step the device thread woke the loop for (its own).
        self._wait_until_step: int | None = None
        self._woken_at_step: int | None = None
        self._state: DecoderState | None = None
        # NOTE: the token each running row reads at the next step, kept on the device.
        self._feed: Tensor | None = None
        self._closed = False
        self._stopped = False
        self._step_seconds = 0.005
        self._wakeup: asyncio.Event | None = None
        self._prefill_wakeup: asyncio.Event | None = None
        self._emptied: asyncio.Event | None = None  # set when nothing waits, encodes or runs
        self._task: asyncio.Task[None] | None = None
        self._prefill_task: asyncio.Task[None] | None = None

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Create the asyncio objects and the scheduling tasks (inside the running loop)."""
        loop = asyncio.get_running_loop()
        self._wakeup = asyncio.Event()
        self._prefill_wakeup = asyncio.Event()
        self._emptied = asyncio.Event()
        self._task = loop.create_task(self._run(), name=f"decoder-{self.model}-{self.version}")
        self._task.add_done_callback(self._task_done)
        self._prefill_task = loop.create_task(
            self._run_prefill(), name=f"decoder-prefill-{self.model}-{self.version}"
        )
        self._prefill_task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        # NOTE: the scheduling tasks only end by cancellation; if a bug ends one, fail every job
        # (and refuse more) rather than leave callers waiting forever.
        if task.cancelled() or task.exception() is None:
            return
        log.error(
            "model %s version %s: decoder stopped: %r", self.model, self.version, task.exception()
        )
        self._closed = True
        self._stopped = True  # a burst in flight ends at its next step
        # NOTE: the other task stops too: an encode it finishes later would join no batch.
        for sibling in (self._task, self._prefill_task):
            if sibling is not None and sibling is not task:
                sibling.cancel()
        self._fail_all(ComputeError(f"model {self.model} version {self.version}: internal error"))
        self._gauges()

    @property
    def slots_in_use(self) -> int:
        """Rows reserved by requests being encoded, about to join or running."""
        return self._reserved - self._released

    @property
    def queue_depth(self) -> int:
        """Sequences waiting for a slot."""
        return len(self._waiting)

    async def warm_up(self, source: np.ndarray) -> None:
        """Encode one short sequence (on both threads) and run one step (outside any metric)."""
        network = self._network

        def warm() -> None:
            state, bos = self._encode([source])
            network.step(state, bos)

        await self._prefill.run(self._encode, [source])
        await self._executor.run(warm)

    async def drain(self) -> None:
        """Stop admitting; finish every admitted job; then stop the tasks."""
        self._closed = True
        assert self._wakeup is not None and self._emptied is not None
        while not self._empty():
            self._wakeup.set()
            if self._prefill_wakeup is not None:
                self._prefill_wakeup.set()
            self._emptied.clear()
            await self._emptied.wait()
        await self.stop()

    async def stop(self) -> None:
        """Stop at once: waiting and running jobs fail with `Draining`."""
        self._closed = True
        self._stopped = True  # a burst in flight ends at its next step
        for task in (self._task, self._prefill_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._task = self._prefill_task = None
        self._fail_all(Draining(f"model {self.model} version {self.version} is unloading"))
        self._gauges()

    def _empty(self) -> bool:
        return not (self._waiting or self._encoding or self._ready or self._running)

    def _check_emptied(self) -> None:
        # NOTE: `drain` waits on this instead of polling.
        if self._empty() and self._emptied is not None:
            self._emptied.set()

    def _fail_all(self, error: ServiceError) -> None:
        jobs = [*self._waiting, *self._encoding, *self._running]
        jobs += [job for group, _, _ in list(self._ready) for job in group]
        for job in jobs:
            if not job.future.done():
                job.future.set_exception(error)
        self._waiting.clear()
        self._encoding = []
        self._ready.clear()
        self._clear_running()
        self._reserved = self._released = 0
        self._check_emptied()

    # -- admission (on the loop) -----------------------------------------------------------

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
        step = self._steps
        for job in jobs:
            job.enqueued_step = step
        self._waiting.extend(jobs)
        self._gauges()
        assert self._prefill_wakeup is not None
        self._prefill_wakeup.set()

    def _gauges(self) -> None:
        self._m_depth.set(len(self._waiting))
        self._m_slots.set(self.slots_in_use)

    def _should_encode(self) -> bool:
        # NOTE: encoding newcomers costs about as much for one row as for many, so encodes are
        # grouped (as TGI's waiting_served_ratio / max_waiting_tokens): at once when nothing
        # runs, else when enough wait or the oldest has waited max_wait_steps.
        if not self._waiting or self._encoding:
            return False
        running = len(self._running) + sum(len(group) for group, _, _ in self._ready)
        if not running:
            return True
        if self.slots_in_use + self._waiting[0].beam_size > self.max_slots:
            return False  # the next one does not fit until rows leave
        due = self._waiting[0].enqueued_step + self.max_wait_steps
        if self._steps >= due or len(self._waiting) >= max(1, int(running * self.join_fraction)):
            return True
        # NOTE: the device thread wakes the loop at that step, not only at the end of its
        # burst (up to max_burst steps later).
        self._wait_until_step = due
        return False

    def _take(self) -> list[Job]:
        """Take waiting jobs that fit into free slots (reserving them); drop expired and
        cancelled ones on the way."""
        now = time.monotonic()
        taken: list[Job] = []
        free = self.max_slots - self.slots_in_use
        while self._waiting and len(taken) < self.max_admit:
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
            if job.beam_size > free:
                break
            self._waiting.popleft()
            free -= job.beam_size
            job.rows = 1
            if job.beam_size > 1:
                job.search = BeamSearch(job.beam_size, self._spec.eos_id, job.max_length)
            taken.append(job)
            self._m_queue.observe(now - job.enqueued)
        self._reserved += sum(job.beam_size for job in taken)
        return taken

    def _expire(self, job: Job, now: float) -> None:
        self._m_dropped_deadline.inc()
        if not job.future.done():
            job.future.set_exception(self._deadline_error(job, now))

    def _deadline_error(self, job: Job, now: float) -> DeadlineExceeded:
        return DeadlineExceeded(
            f"deadline passed after {now - job.enqueued:.3f} s decoding with model "
            f"{self.model} version {self.version} ({len(job.tokens)} tokens produced)"
        )

    # -- the scheduling tasks (on the loop) --------------------------------------------------

    async def _run_prefill(self) -> None:
        """Take waiting jobs when due, encode them on the prefill thread and hand them to the
        device thread."""
        assert self._prefill_wakeup is not None and self._wakeup is not None
        while True:
            if not self._should_encode():
                self._check_emptied()
                self._prefill_wakeup.clear()
                await self._prefill_wakeup.wait()
                continue
            jobs = self._take()
            self._gauges()
            if not jobs:
                continue
            self._encoding = jobs
            try:
                (state, bos), seconds = await self._prefill.run(
                    self._encode, [job.source for job in jobs]
                )
            except Exception as exc:
                self._encoding = []
                self._reserved -= sum(job.beam_size for job in jobs)
                self._fail(jobs, exc)
                continue
            self._m_encode_compute.observe(seconds)
            self._m_encode_rows.observe(len(jobs))
            self._m_encode_calls.inc()
            # NOTE: ready before no longer encoding: `drain` never sees the jobs nowhere.
            self._ready.append((jobs, state, bos))
            self._encoding = []
            self._wakeup.set()

    async def _run(self) -> None:
        assert self._wakeup is not None and self._prefill_wakeup is not None
        loop = asyncio.get_running_loop()
        while True:
            if not self._running and not self._ready:
                self._check_emptied()
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            try:
                steps, _ = await self._executor.run(self._burst, loop)
            except Exception as exc:
                failed = self._running
                self._clear_running()
                self._fail(failed, exc)
                self._prefill_wakeup.set()  # their slots are free for the waiting ones
                continue
            for rows, seconds in steps:
                self._step_seconds = 0.8 * self._step_seconds + 0.2 * seconds
                self._m_compute.observe(seconds)
                self._m_rows.observe(rows)
                self._m_calls.inc()
            self._gauges()
            self._prefill_wakeup.set()
            # NOTE: a loop turn lets finished callers submit again before the next burst.
            await asyncio.sleep(0)

    # -- on the worker threads ---------------------------------------------------------------

    def _encode(self, sources: list[np.ndarray]) -> tuple[DecoderState, Tensor]:
        """Encode sources together: their decoder state and first input (<bos>)."""
        padded, lengths = collate(sources)
        padded = padded.to(self._device)
        if padded.is_floating_point():
            padded = padded.to(self._dtype)
        state = self._network.encode(padded, lengths)
        bos = torch.full((len(sources),), self._spec.bos_id, dtype=torch.int64, device=self._device)
        return state, bos

    def _burst(self, loop: asyncio.AbstractEventLoop) -> list[tuple[int, float]]:
        """Join waiting groups and run decode steps until nothing runs or max_burst steps;
        returns (rows, seconds) per step. Runs on the device thread.

        NOTE: while this runs the loop only appends to `_ready` and reads counters; results,
        tokens and errors go back with `loop.call_soon_threadsafe`.
        """
        network = self._network
        steps: list[tuple[int, float]] = []
        while len(steps) < self.max_burst and not self._stopped:
            if self._ready:
                self._join()
            if not self._running:
                break
            start = time.perf_counter()
            assert self._state is not None and self._feed is not None
            log_probs, state = network.step(self._state, self._feed)
            # NOTE: greedy rows need only their arg-max: it is taken on the device and only the
            # ids cross to the host; beam rows need their log-probs (all rows are copied then).
            best = log_probs.argmax(dim=-1)
            host = log_probs.float().cpu() if self._beams else None
            rows = log_probs.shape[0]
            keep, beam_feed = self._advance(loop, best.tolist(), host)
            if not self._running:
                self._state = None
                self._feed = None
            elif beam_feed is not None:
                self._state = state.select(torch.tensor(keep, dtype=torch.int64))
                self._feed = torch.tensor(beam_feed, dtype=torch.int64, device=self._device)
            elif len(keep) < rows:
                index = torch.tensor(keep, dtype=torch.int64, device=self._device)
                self._state = state.select(index)
                self._feed = best.index_select(0, index)
            else:
                self._state = state
                self._feed = best
            self._steps += 1
            steps.append((rows, time.perf_counter() - start))
            due = self._wait_until_step
            if due is not None and self._steps >= due and due != self._woken_at_step:
                self._woken_at_step = due
                assert self._prefill_wakeup is not None
                loop.call_soon_threadsafe(self._prefill_wakeup.set)
        return steps

    def _join(self) -> None:
        """Add every encoded group waiting in `_ready` to the running batch (one copy)."""
        # NOTE: the groups join `_running` before they leave `_ready`: the loop (drain) must
        # never see them in neither. Groups the loop appends meanwhile wait for the next join.
        groups = list(self._ready)
        jobs = [job for group, _, _ in groups for job in group]
        states = [state for _, state, _ in groups]
        feeds = [bos for _, _, bos in groups]
        if self._state is not None and self._feed is not None:
            states.insert(0, self._state)
            feeds.insert(0, self._feed)
        self._running.extend(jobs)
        for _ in groups:
            self._ready.popleft()
        self._beams += sum(job.search is not None for job in jobs)
        self._state = states[0] if len(states) == 1 else DecoderState.cat(states)
        self._feed = feeds[0] if len(feeds) == 1 else torch.cat(feeds)

    def _advance(
        self, loop: asyncio.AbstractEventLoop, best: list[int], log_probs: Tensor | None
    ) -> tuple[list[int], list[int] | None]:
        """Apply one step to each running job; return the rows to keep and, when beams run,
        the token each kept row reads next (else it is its arg-max)."""
        now = time.monotonic()
        keep: list[int] = []
        feed: list[int] | None = None if log_probs is None else []
        survivors: list[Job] = []
        emitted: list[tuple[Job, int]] = []
        offset = 0
        eos = self._spec.eos_id
        finished: list[tuple[Job, list[int]]] = []
        expired: list[Job] = []
        left: list[Job] = []
        cancelled = 0
        for job in self._running:
            start, offset = offset, offset + job.rows
            if job.dead:  # NOTE: a read of a flag the loop may set; at worst one step late
                cancelled += 1
                left.append(job)
                continue
            if job.deadline is not None and job.deadline <= now:
                expired.append(job)
                left.append(job)
                continue
            search = job.search
            if search is None:
                token = best[start]
                if token == eos:
                    finished.append((job, job.tokens))
                    left.append(job)
                    continue
                job.tokens.append(token)
                if job.on_token is not None:
                    emitted.append((job, token))
                if len(job.tokens) >= job.max_length:
                    finished.append((job, job.tokens))
                    left.append(job)
                    continue
                keep.append(start)
                if feed is not None:
                    feed.append(token)
            else:
                assert log_probs is not None and feed is not None
                parents, chosen = search.step(log_probs[start:offset])
                if search.done:
                    finished.append((job, search.best()))
                    left.append(job)
                    continue
                keep.extend((parents + start).tolist())
                feed.extend(chosen.tolist())
                job.rows = len(parents)
            survivors.append(job)
        if emitted or finished or expired or cancelled:
            # NOTE: one hand-over per step; tokens first, so a stream sees its last token
            # before its result.
            loop.call_soon_threadsafe(self._deliver, emitted, finished, expired, cancelled, now)
        for job in left:
            self._released += job.beam_size
            if job.search is not None:
                self._beams -= 1
        self._running = survivors
        return keep, feed

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
        if self._waiting and self._prefill_wakeup is not None:
            self._prefill_wakeup.set()  # rows left: slots may be free

    def _clear_running(self) -> None:
        # NOTE: only when no burst runs (the device thread owns the running batch).
        self._released += sum(job.beam_size for job in self._running)
        self._running = []
        self._beams = 0
        self._state = None
        self._feed = None

    def _fail(self, jobs: list[Job], exc: Exception) -> None:
        """Fail `jobs` with `exc` (a ServiceError as it is, any other as a ComputeError)."""
        log.error(
            "model %s version %s: decoding failed: %s: %s",
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
        for job in jobs:
            if not job.future.done():
                job.future.set_exception(error)
        self._gauges()
