"""The decode scheduler: continuous batching of seq2seq decoding, one step at a time.

One per seq2seq model version. Every step is one model call over all running rows (any mix of
requests, source lengths, greedy rows and beams):
- waiting requests are encoded together and join the running batch between steps. An encode
  starts when nothing runs, or when the waiting requests number `join_fraction` of the running
  ones, or the oldest has waited `max_wait_steps` steps (encoding one costs about as much as
  encoding many; the device thread wakes the loop at that step, mid-burst). The encode runs
  on the `prefill` executor (a second worker thread) while the running batch keeps stepping;
  when nothing of the version runs and the device is free, the device thread encodes the group
  itself as the burst that decodes it begins (two thread hand-offs fewer before the first step);
- a row leaves at once when its request is done (<eos>, max_length), cancelled (client gone) or
  past its deadline, so a long output never holds short ones hostage;
- greedy decoding streams each token as it is chosen (`Job.on_token`); beam search reorders its
  rows with `models.beam_search.BeamSearch` each step and hands out only its final best tokens.
Slots: a greedy request uses one row, a beam request reserves `beam_size` rows from the moment
its encode starts; at most `max_slots` rows run together (`rnnserve_decode_slots_in_use`). The
computation is the same as `Seq2SeqModel.generate` (same `encode`, `step`, `BeamSearch`), so
outputs equal offline decoding. Steps run in bursts on the device thread (one executor call for
as long as rows run, not one per step); encoded newcomers join inside a burst. Each step's
results go back to the loop at once. Per step the device thread copies only the chosen token ids
to the host (and the log-probs of beam rows); the next step's input stays on the device.

Sharing. One request may hold at most `max_request_slots` rows and `max_request_work` rows ×
source steps of the running batch at once (its first sequence always runs); its other sequences
wait while later requests go ahead, so a request of many long beams neither takes every slot nor
makes every step slow for the others. An encode group holds at most `max_group_steps` source
steps (one sequence at least). A burst gives the device back after `turn_s` when other work
(another model's batch) waits for it.

Threads, and what each owns (NOTE: the invariants; a change must keep them):
- the event loop owns admission and all the bookkeeping: the waiting queue (`_waiting`), the
  jobs being encoded (`_encoding`), the jobs handed to the device thread and not yet reported
  gone (`_admitted`), slot and per-request reservations (`_reserved`, `Share`), the tasks,
  events and metrics. The device thread reports each job that leaves with one
  `call_soon_threadsafe` per step (`_deliver`), and only then does the loop release its slots.
- the prefill thread runs `_encode`, a function of its arguments only (so does the device
  thread for a group queued unencoded, `(jobs, None, None)` in `_ready`; a failure there goes
  back with one `call_soon_threadsafe`, `_encode_failed`).
- the device thread owns the running batch (`_running`, `_state`, `_feed`, `_beams`) and the
  step count (`_steps`) while a burst runs. The loop touches the running batch only while no
  burst is in flight (`_bursting`, which the loop sets when it submits a burst and clears when
  the device thread has returned from it).
- shared: `_ready`, the encoded groups waiting to join (the loop appends, the device thread takes
  them all), under `_lock`; flags and counters one side writes and the other only reads
  (`_stopped`, `_wait_until_step`, `_steps`, `Job.future.done()`).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from models.beam_search import BeamSearch
from models.config import ServingSpec
from models.encoder import collate
from models.seq2seq import DecoderState, Seq2SeqModel
from service.core.errors import (
    ComputeError,
    DeadlineExceeded,
    Overloaded,
    ServiceError,
)
from service.core.executor import DeviceExecutor, settle
from service.core.lifecycle import Scheduler
from service.core.metrics import Metrics
from service.core.settings import Settings

log = logging.getLogger(__name__)

# A burst gives the device back after this long when other work (an encode batch of another
# model, another model's burst) is queued on it: that work waits at most about one step more.
DEVICE_TURN_S = 0.005


@dataclass(eq=False)
class Share:
    """What one generate request (the jobs of one `submit`) holds of the running batch: rows
    and rows × source steps reserved by its jobs being encoded or decoded (loop-owned)."""

    slots: int = 0
    work: int = 0


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
    share: Share | None = None  # its request's share, set by `submit`

    @property
    def dead(self) -> bool:
        return self.future.done()

    @property
    def length(self) -> int:
        """Source steps."""
        return int(self.source.shape[0])

    @property
    def work(self) -> int:
        """Rows × source steps: what one decode step of this job costs, roughly."""
        return self.beam_size * self.length


@dataclass(frozen=True, slots=True)
class DecodeLimits:
    """What one seq2seq version's decoding takes on at once, and each request's share of it."""

    max_slots: int  # rows (greedy requests and beams) in the running batch
    max_queue: int  # sequences waiting for a slot before `Overloaded`
    max_group_size: int  # sequences encoded together (the model's max_batch_size)
    max_group_steps: int  # source steps encoded together (one sequence at least)
    max_request_slots: int  # rows of one request in the running batch
    max_request_work: int  # rows × source steps of one request in the running batch
    join_fraction: float = 0.5  # waiting requests ÷ running ones that start an encode
    max_wait_steps: int = 16  # ...or the steps the oldest waiting one has waited

    @classmethod
    def of(cls, settings: Settings, serving: ServingSpec) -> DecodeLimits:
        """The limits a server's settings give a model of these serving options."""
        budget = serving.max_batch_size * 128
        return cls(
            max_slots=settings.max_decode_slots,
            max_queue=settings.max_decode_queue,
            max_group_size=serving.max_batch_size,
            max_group_steps=settings.max_batch_timesteps or budget,
            max_request_slots=settings.request_decode_slots(),
            max_request_work=settings.max_request_decode_work or budget,
            join_fraction=settings.decode_join_fraction,
            max_wait_steps=settings.decode_max_wait_steps,
        )


# An encoded group waiting to join the running batch: its jobs, their decoder state, their first
# input (<bos>); (jobs, None, None) for a group the device thread encodes as it joins.
Group = tuple[list[Job], DecoderState | None, Tensor | None]
# (rows, seconds) of model calls made in a burst, for the metrics.
Calls = list[tuple[int, float]]


@dataclass(eq=False, slots=True)
class _StepOutcome:
    """What one decode step hands back to the loop (made on the device thread)."""

    now: float  # time.monotonic() of the step
    emitted: list[tuple[Job, int]] = field(default_factory=list)  # streamed tokens
    finished: list[tuple[Job, list[int]]] = field(default_factory=list)  # results
    expired: list[Job] = field(default_factory=list)  # past their deadline
    cancelled: int = 0  # jobs whose client left
    left: list[Job] = field(default_factory=list)  # every job that left the batch
    # (rows, seconds) of the burst's steps and encodes not yet handed over, this one's included:
    # recorded before the results they made are
    steps: list[tuple[int, float]] = field(default_factory=list)
    encodes: list[tuple[int, float]] = field(default_factory=list)

    def finish(self, job: Job, tokens: list[int]) -> None:
        self.finished.append((job, tokens))
        self.left.append(job)


def _advance_beam(
    job: Job,
    search: BeamSearch,
    log_probs: Tensor,
    start: int,
    end: int,
    keep: list[int],
    feed: list[int],
    step: _StepOutcome,
) -> bool:
    """One step of a beam job whose rows are `start:end` of the batch: its surviving rows are
    added to `keep` and their next tokens to `feed`; False once its search is done."""
    parents, chosen = search.step(log_probs[start:end])
    if search.done:
        step.finish(job, search.best())
        return False
    keep.extend((parents + start).tolist())
    feed.extend(chosen.tolist())
    job.rows = len(parents)
    return True


class DecodeScheduler(Scheduler):
    """Runs the decode batch of one seq2seq model version on the device executor."""

    kind = "decoder"
    activity = "decoding"

    def __init__(
        self,
        model: str,
        version: int,
        network: Seq2SeqModel,
        executor: DeviceExecutor,
        prefill: DeviceExecutor,
        metrics: Metrics,
        limits: DecodeLimits,
        *,
        max_burst: int = 16,
        turn_s: float = DEVICE_TURN_S,
    ) -> None:
        super().__init__(model, version)
        self.limits = limits
        self.max_burst = max_burst
        self.turn_s = turn_s
        parameter = next(network.parameters())
        self._device = parameter.device
        self._dtype = parameter.dtype
        self._m_queue = metrics.queue(model, version, "decode")
        self._m_steps = metrics.calls(model, version, "decode")
        self._m_encodes = metrics.calls(model, version, "encode")
        self._m_slots = metrics.decode_slots_in_use.labels(model, str(version))
        self._network = network
        self._spec = network.decoder_spec
        self._executor = executor
        self._prefill = prefill
        # -- the loop's --
        self._waiting: deque[Job] = deque()
        self._encoding: list[Job] = []
        # Jobs handed to the device thread (in `_ready` or running) that it has not reported
        # gone yet; a dict as an ordered set.
        self._admitted: dict[Job, None] = {}
        self._reserved = 0  # slots held by `_encoding` and `_admitted`
        self._bursting = False  # a burst is on the device executor (queued or running)
        self._step_seconds = 0.005
        # The step at which the oldest waiting request has waited max_wait_steps (the device
        # thread reads it to wake the loop mid-burst).
        self._wait_until_step: int | None = None
        self._wakeup: asyncio.Event | None = None
        self._prefill_wakeup: asyncio.Event | None = None
        # -- shared: encoded groups to join (the loop appends, the device thread takes) --
        self._lock = threading.Lock()
        self._ready: list[Group] = []
        # -- the device thread's (during a burst) --
        self._running: list[Job] = []  # in row order
        self._beams = 0  # beam-search jobs in `_running`: they need host log-probs
        self._steps = 0
        self._woken_at_step: int | None = None
        self._state: DecoderState | None = None
        # NOTE: the token each running row reads at the next step, kept on the device.
        self._feed: Tensor | None = None

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Create the asyncio objects and the scheduling tasks (inside the running loop)."""
        self._wakeup = asyncio.Event()
        self._prefill_wakeup = asyncio.Event()
        self._start_tasks(("decoder", self._run()), ("decoder-prefill", self._run_prefill()))

    @property
    def slots_in_use(self) -> int:
        """Rows reserved by requests being encoded, about to join or running."""
        return self._reserved

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

    # -- the life (service/core/lifecycle.py) -------------------------------------------------

    def _empty(self) -> bool:
        return not (self._waiting or self._encoding or self._admitted)

    def _wake(self) -> None:
        assert self._wakeup is not None and self._prefill_wakeup is not None
        self._wakeup.set()
        self._prefill_wakeup.set()

    def _fail_waiting(self, error: ServiceError) -> None:
        # NOTE: a burst in flight ends at its next step (`_stopping`); nothing decodes any more.
        self._fail_everything(error)

    def _fail_everything(self, error: ServiceError) -> None:
        """Fail every job the scheduler knows (on the loop)."""
        jobs = [*self._waiting, *self._encoding, *self._admitted]
        for job in jobs:
            if not job.future.done():
                job.future.set_exception(error)
        self._waiting.clear()
        self._encoding = []
        self._admitted.clear()
        self._reserved = 0
        if not self._bursting:
            # NOTE: the device thread is not in a burst: the running batch is the loop's to
            # clear. With a burst in flight it ends at its next step (`_stopping`) and nothing
            # reads the batch again.
            with self._lock:
                self._ready = []
            self._clear_running()
        self._gauges()
        self._check_emptied()

    # -- admission (on the loop) -----------------------------------------------------------

    def submit(self, jobs: list[Job]) -> None:
        """Admit all of `jobs` (one request) or none: `Overloaded` when the waiting queue cannot
        take them."""
        self._check_admitting()
        if len(self._waiting) + len(jobs) > self.limits.max_queue:
            raise Overloaded(
                f"model {self.model} version {self.version}: decode queue full "
                f"({len(self._waiting)} of {self.limits.max_queue} sequences waiting)",
                retry_after_s=round(max(0.05, self._step_seconds * self._spec.max_length), 3),
            )
        limit = min(self.limits.max_slots, self.limits.max_request_slots)
        for job in jobs:
            if job.beam_size > limit:
                raise Overloaded(f"beam_size {job.beam_size} exceeds the {limit} decode slots")
        share = Share()
        step = self._steps
        for job in jobs:
            job.enqueued_step = step
            job.share = share
        self._waiting.extend(jobs)
        self._gauges()
        assert self._prefill_wakeup is not None
        self._prefill_wakeup.set()

    def _gauges(self) -> None:
        self._m_queue.depth.set(len(self._waiting))
        self._m_slots.set(self._reserved)

    def _fits_share(self, job: Job) -> bool:
        """Whether `job` may start now within its request's share (its first one always may)."""
        share = job.share
        if share is None or share.slots == 0:
            return True
        return (
            share.slots + job.beam_size <= self.limits.max_request_slots
            and share.work + job.work <= self.limits.max_request_work
        )

    def _should_encode(self) -> bool:
        # NOTE: encoding newcomers costs about as much for one row as for many, so encodes are
        # grouped (as TGI's waiting_served_ratio / max_waiting_tokens): at once when nothing
        # runs, else when enough wait or the oldest has waited max_wait_steps.
        if not self._waiting or self._encoding:
            return False
        running = len(self._admitted)
        head = next((job for job in self._waiting if self._fits_share(job)), None)
        if head is None:
            return False  # every waiting request holds its share: rows leaving wake us
        if not running:
            return True
        if self._reserved + head.beam_size > self.limits.max_slots:
            return False  # the next one does not fit until rows leave
        due = head.enqueued_step + self.limits.max_wait_steps
        if self._steps >= due or len(self._waiting) >= max(
            1, int(running * self.limits.join_fraction)
        ):
            return True
        # NOTE: the device thread wakes the loop at that step, not only at the end of its
        # burst (up to max_burst steps later).
        self._wait_until_step = due
        return False

    def _take(self) -> list[Job]:
        """Take waiting jobs that fit into free slots and their requests' shares (reserving
        them), up to one encode group; drop expired and cancelled ones on the way."""
        now = time.monotonic()
        taken: list[Job] = []
        kept: deque[Job] = deque()
        free = self.limits.max_slots - self._reserved
        steps = 0
        blocked = False
        for job in self._waiting:
            if blocked or len(taken) >= self.limits.max_group_size:
                kept.append(job)
                continue
            # NOTE: deadline first: a waiter that gave up at its deadline also cancelled it.
            if job.deadline is not None and job.deadline <= now:
                self._expire(job, now)
                continue
            if job.dead:
                self._m_queue.dropped_cancelled.inc()
                continue
            if job.beam_size > free:
                # NOTE: first come, first served for slots: a wide beam is not starved by the
                # narrow ones behind it.
                blocked = True
                kept.append(job)
                continue
            if not self._fits_share(job):
                kept.append(job)  # its request holds its share; later requests go ahead
                continue
            if taken and steps + job.length > self.limits.max_group_steps:
                blocked = True
                kept.append(job)
                continue
            free -= job.beam_size
            steps += job.length
            self._reserve(job)
            job.rows = 1
            if job.beam_size > 1:
                job.search = BeamSearch(job.beam_size, self._spec.eos_id, job.max_length)
            taken.append(job)
            self._m_queue.waited.observe(now - job.enqueued)
        self._waiting = kept
        return taken

    def _reserve(self, job: Job) -> None:
        self._reserved += job.beam_size
        if job.share is not None:
            job.share.slots += job.beam_size
            job.share.work += job.work

    def _release(self, job: Job) -> None:
        self._reserved -= job.beam_size
        if job.share is not None:
            job.share.slots -= job.beam_size
            job.share.work -= job.work

    def _expire(self, job: Job, now: float) -> None:
        self._m_queue.dropped_deadline.inc()
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
        assert self._prefill_wakeup is not None
        while True:
            if not self._should_encode():
                self._check_emptied()
                self._prefill_wakeup.clear()
                await self._prefill_wakeup.wait()
                continue
            # NOTE: one group per call, so that no local keeps its jobs (and their sources,
            # results and errors) alive until the next encode.
            await self._encode_group()

    async def _encode_group(self) -> None:
        assert self._wakeup is not None
        jobs = self._take()
        self._gauges()
        if not jobs:
            self._check_emptied()
            return
        if not self._admitted and self._executor.idle:
            # NOTE: nothing of ours runs and the device is free: the device thread encodes the
            # group as the burst that decodes it begins (the prefill thread and a loop turn in
            # between would cost two thread wake-ups before the first step).
            for job in jobs:
                self._admitted[job] = None
            with self._lock:
                self._ready.append((jobs, None, None))
            self._wakeup.set()
            return
        self._encoding = jobs
        try:
            (state, bos), seconds = await self._prefill.run(
                self._encode, [job.source for job in jobs]
            )
        except Exception as exc:
            self._encoding = []
            for job in jobs:
                self._release(job)
            self._fail(jobs, exc)
            self._check_emptied()
            return
        self._m_encodes.observe(seconds, len(jobs))
        # NOTE: admitted before no longer encoding: `drain` never sees the jobs nowhere.
        for job in jobs:
            self._admitted[job] = None
        with self._lock:
            self._ready.append((jobs, state, bos))
        self._encoding = []
        self._wakeup.set()

    async def _run(self) -> None:
        assert self._wakeup is not None and self._prefill_wakeup is not None
        loop = asyncio.get_running_loop()
        while True:
            if not self._admitted:
                self._check_emptied()
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            try:
                steps, encodes = await self._submit_burst(loop)
            except Exception as exc:
                self._burst_failed(exc)
                continue
            self._record(steps, encodes)
            self._gauges()
            self._prefill_wakeup.set()
            # NOTE: a loop turn lets finished callers submit again before the next burst.
            await asyncio.sleep(0)

    def _stepped(self, steps: Calls, encodes: Calls) -> None:
        """On the loop, for each `max_burst` steps of a burst: record the steps and the encodes
        made on the device thread, refresh the gauges and let admission look at the waiting
        queue."""
        if not self._record(steps, encodes):
            return
        self._gauges()
        assert self._prefill_wakeup is not None
        self._prefill_wakeup.set()

    def _record(self, steps: Calls, encodes: Calls) -> bool:
        """Record steps and encodes made on the device thread; False when there were none."""
        if encodes:
            self._m_encodes.observe_many(encodes)
        if not steps:
            return bool(encodes)
        for _, seconds in steps:
            self._step_seconds = 0.8 * self._step_seconds + 0.2 * seconds
        self._m_steps.observe_many(steps)
        return True

    def _burst_failed(self, exc: Exception) -> None:
        """A burst raised: fail the jobs it was running and free their slots."""
        # NOTE: the burst has returned (`_bursting` is off): the batch is the loop's to clear.
        failed = [job for job in self._running if job in self._admitted]
        self._clear_running()
        for job in failed:
            del self._admitted[job]
            self._release(job)
        self._fail(failed, exc)
        self._check_emptied()
        assert self._prefill_wakeup is not None
        self._prefill_wakeup.set()  # their slots are free for the waiting ones

    async def _submit_burst(self, loop: asyncio.AbstractEventLoop) -> tuple[Calls, Calls]:
        """Run one burst on the device thread; `_bursting` is on until the thread returns from
        it, even when this task is cancelled meanwhile."""
        future: asyncio.Future[tuple[tuple[Calls, Calls], float]] = loop.create_future()
        hand_over = settle(future)

        def done(
            result: tuple[tuple[Calls, Calls], float] | None, exc: BaseException | None
        ) -> None:
            self._bursting = False
            hand_over(result, exc)

        self._bursting = True
        try:
            self._executor.submit(self._burst, done, loop)
        except BaseException:
            self._bursting = False
            raise
        calls, _ = await future
        return calls

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

    def _burst(self, loop: asyncio.AbstractEventLoop) -> tuple[Calls, Calls]:
        """Join waiting groups and run decode steps until nothing runs or the device is wanted
        by other work; returns (rows, seconds) of the steps and of the encodes not yet handed
        over. On the device thread.

        NOTE: results, tokens and departures go back with `loop.call_soon_threadsafe`, and so do
        the steps' figures every `max_burst` steps (`_stepped`) while the burst goes on: ending
        the burst instead and waiting for the loop to start the next one would cost the device
        two thread wake-ups, on a loaded host each one a wait for a core.
        """
        network = self._network
        steps: Calls = []
        encodes: Calls = []
        started = time.perf_counter()
        while not self._stopping:
            self._join(loop, encodes)
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
            tokens = best.tolist()
            steps.append((rows, time.perf_counter() - start))
            keep, beam_feed = self._advance(loop, tokens, host, steps, encodes)
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
            now = time.perf_counter()
            if len(steps) >= self.max_burst:
                loop.call_soon_threadsafe(self._stepped, steps, encodes)
                steps, encodes = [], []
            due = self._wait_until_step
            if due is not None and self._steps >= due and due != self._woken_at_step:
                self._woken_at_step = due
                assert self._prefill_wakeup is not None
                loop.call_soon_threadsafe(self._prefill_wakeup.set)
            # NOTE: `pending` counts this burst too; more means other work waits for the device.
            if self._executor.pending > 1 and now - started >= self.turn_s:
                break
        return steps, encodes

    def _join(self, loop: asyncio.AbstractEventLoop, encodes: Calls) -> None:
        """Add every group waiting in `_ready` to the running batch (one copy), encoding those
        not encoded yet (their encodes go to `encodes`; a failed one fails only its own jobs)."""
        with self._lock:
            groups, self._ready = self._ready, []
        if not groups:
            return
        joined: list[tuple[list[Job], DecoderState, Tensor]] = []
        for group, state, bos in groups:
            if state is None or bos is None:
                start = time.perf_counter()
                try:
                    state, bos = self._encode([job.source for job in group])
                except Exception as exc:
                    loop.call_soon_threadsafe(self._encode_failed, group, exc)
                    continue
                encodes.append((len(group), time.perf_counter() - start))
            joined.append((group, state, bos))
        if not joined:
            return
        jobs = [job for group, _, _ in joined for job in group]
        states = [state for _, state, _ in joined]
        feeds = [bos for _, _, bos in joined]
        if self._state is not None and self._feed is not None:
            states.insert(0, self._state)
            feeds.insert(0, self._feed)
        self._running.extend(jobs)
        self._beams += sum(job.search is not None for job in jobs)
        self._state = states[0] if len(states) == 1 else DecoderState.cat(states)
        self._feed = feeds[0] if len(feeds) == 1 else torch.cat(feeds)

    def _advance(
        self,
        loop: asyncio.AbstractEventLoop,
        best: list[int],
        log_probs: Tensor | None,
        steps: Calls,
        encodes: Calls,
    ) -> tuple[list[int], list[int] | None]:
        """Apply one step to each running job; return the rows to keep and, when beams run,
        the token each kept row reads next (else it is its arg-max). A hand-over to the loop
        takes `steps` and `encodes` along (and empties them)."""
        if log_probs is None:
            return self._advance_greedy(loop, best, steps, encodes), None
        now = time.monotonic()
        keep: list[int] = []
        feed: list[int] | None = None if log_probs is None else []
        survivors: list[Job] = []
        step = _StepOutcome(now)
        left = step.left
        offset = 0
        eos = self._spec.eos_id
        for job in self._running:
            start, offset = offset, offset + job.rows
            if job.dead:  # NOTE: a read of a flag the loop may set; at worst one step late
                step.cancelled += 1
                left.append(job)
            elif job.deadline is not None and job.deadline <= now:
                step.expired.append(job)
                left.append(job)
            elif job.search is not None:
                assert log_probs is not None and feed is not None
                if _advance_beam(job, job.search, log_probs, start, offset, keep, feed, step):
                    survivors.append(job)
            else:
                token = best[start]
                if token == eos:
                    step.finish(job, job.tokens)
                    continue
                job.tokens.append(token)
                if job.on_token is not None:
                    step.emitted.append((job, token))
                if len(job.tokens) >= job.max_length:
                    step.finish(job, job.tokens)
                    continue
                keep.append(start)
                if feed is not None:
                    feed.append(token)
                survivors.append(job)
        if step.emitted or left:
            self._hand_over(loop, step, steps, encodes)
        self._beams -= sum(job.search is not None for job in left)
        self._running = survivors
        return keep, feed

    def _hand_over(
        self, loop: asyncio.AbstractEventLoop, step: _StepOutcome, steps: Calls, encodes: Calls
    ) -> None:
        # NOTE: one hand-over per step; tokens first, so a stream sees its last token before
        # its result, and the steps' figures before both (read after an answer, they count
        # every step that made it).
        step.steps.extend(steps)
        step.encodes.extend(encodes)
        steps.clear()
        encodes.clear()
        loop.call_soon_threadsafe(self._deliver, step)

    def _advance_greedy(
        self, loop: asyncio.AbstractEventLoop, best: list[int], steps: Calls, encodes: Calls
    ) -> list[int]:
        """`_advance` when no beam runs: one row per job, in order (the device thread's
        per-row Python is most of its own time per step: `python -m bench.overhead`)."""
        now = time.monotonic()
        keep: list[int] = []
        survivors: list[Job] = []
        step = _StepOutcome(now)
        left = step.left
        eos = self._spec.eos_id
        for row, (job, token) in enumerate(zip(self._running, best, strict=True)):
            deadline = job.deadline
            if job.future.done():  # NOTE: a flag the loop may set; at worst one step late
                step.cancelled += 1
                left.append(job)
            elif deadline is not None and deadline <= now:
                step.expired.append(job)
                left.append(job)
            elif token == eos:
                step.finish(job, job.tokens)
            else:
                tokens = job.tokens
                tokens.append(token)
                if job.on_token is not None:
                    step.emitted.append((job, token))
                if len(tokens) >= job.max_length:
                    step.finish(job, tokens)
                else:
                    keep.append(row)
                    survivors.append(job)
        if step.emitted or left:
            self._hand_over(loop, step, steps, encodes)
        self._running = survivors
        return keep

    # -- back on the loop --------------------------------------------------------------------

    def _deliver(self, step: _StepOutcome) -> None:
        """On the loop: stream tokens, set results, expire deadlines, count drops, and free the
        slots of the jobs that left."""
        self._record(step.steps, step.encodes)
        for job, token in step.emitted:
            if job.on_token is not None and not job.future.done():
                job.on_token(token)
        for job, tokens in step.finished:
            if not job.future.done():
                job.future.set_result(tokens)
        for job in step.expired:
            self._expire(job, step.now)
        if step.cancelled:
            self._m_queue.dropped_cancelled.inc(step.cancelled)
        for job in step.left:
            # NOTE: a job the loop already failed (stop) is no longer admitted: freed once.
            if job in self._admitted:
                del self._admitted[job]
                self._release(job)
        if step.left:
            self._gauges()
            self._check_emptied()
            if self._waiting and self._prefill_wakeup is not None:
                self._prefill_wakeup.set()  # rows left: slots may be free

    def _encode_failed(self, jobs: list[Job], exc: Exception) -> None:
        """On the loop: a group the device thread failed to encode leaves; its slots free up."""
        failed = [job for job in jobs if job in self._admitted]
        for job in failed:
            del self._admitted[job]
            self._release(job)
        if failed:
            self._fail(failed, exc)
        self._gauges()
        self._check_emptied()
        assert self._prefill_wakeup is not None
        self._prefill_wakeup.set()

    def _clear_running(self) -> None:
        # NOTE: only when no burst is in flight (the device thread owns the running batch).
        assert not self._bursting
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
