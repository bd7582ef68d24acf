"""The encode batcher: one per model version; a bounded queue of sequences → model calls.

Shape (Ray Serve's batching, plus what an RNN server needs):
- `submit` admits a request's sequences as items (one per sequence) or rejects at once with
  `Overloaded(retry_after_s)` when the bounded queue is full; never partially.
- One background task forms batches. A batch starts when the device is idle (no idle waiting:
  a lone request runs at once), or when it is full (its target size or the cost budget in total
  real time steps), or `max_delay` after its first item. While a batch runs, the next one forms
  and, once full, is queued on the device behind it (two batches in flight at most), so the
  device goes straight from one to the next: answering the first batch's callers and reading
  their next requests overlaps the second's compute instead of leaving the device idle.
- Target size: half the rows in the system (in flight + queued, a decaying maximum), at most
  `max_batch_size`. The next batch goes behind a running one once it has that many rows, and a
  batch takes at most that many (but at least MIN_SPLIT = 16 when queued), so that the two stay
  balanced even after the device went idle with many rows queued. Closed-loop clients then
  settle into two alternating batches: on the CPU a batch's cost is per row, so half the
  callers compute about as fast per sequence as all of them, while one batch of all the
  callers idles the device for their whole turnaround (`python -m bench.probes batch-sizes`,
  `python -m bench.http`).
- Regrouping (idle device only): when a batch finishes, the callers whose requests it completed
  are expected back. If fewer rows are queued than the target (and than those callers' rows plus
  the queue), the next batch waits for them — at most `regroup_fraction` of the finished batch's
  compute time and `regroup_max_s` — and starts as soon as they are there.
- Expired (deadline) and cancelled (client gone) items are dropped before compute, never computed.
- The batch's rows run in one model call, sorted by length (packed); each row may start from its
  own `initial_state` and hand back its `final_state` (streaming sessions).
- Results go only to futures not already done; an exception reaches every item of its batch and
  nothing else. `drain` stops admitting, finishes what was admitted (until a deadline, then
  fails the rest with `Draining`), then stops. If the batching task dies, queued items fail with
  `NotReady` and `on_failure` tells the owner (the registry restarts the version).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from models.config import ServingSpec
from models.encoder import EncoderModel, collate, pool
from models.recurrent import State
from service.core.errors import (
    ComputeError,
    DeadlineExceeded,
    Overloaded,
    ServiceError,
)
from service.core.executor import DeviceExecutor
from service.core.lifecycle import Scheduler
from service.core.metrics import Metrics
from service.core.settings import Settings
from service.core.types import HostState, Pooling

log = logging.getLogger(__name__)


# Batches of one batcher in flight on the device at most: one computing, one queued behind it.
PIPELINE = 2
# A batch takes at most its target size (half the rows in the system), so that two alternate,
# but never fewer than this many rows when more are queued: smaller batches cost more per
# sequence (`python -m bench.probes batch-sizes`).
MIN_SPLIT = 16
# A batch whose padded inputs take more than this is padded on the device thread, not the loop:
# the loop's time is every other request's, and numpy copies large arrays without the GIL.
PAD_ON_LOOP_BYTES = 1 << 20
# How long before the running batch should end the next one is queued behind it when it has
# not reached its target size: enough for a loop turn, the batch's host preparation on the loop
# (`EncodeCompute.prepare`) and the device thread to pick it up (at most a tenth of the running
# batch's time, so that short batches still fill up).
HANDOVER_S = 0.001


@dataclass(frozen=True, slots=True)
class BatchLimits:
    """How one encode version's batches form (see the module)."""

    max_batch_size: int  # rows in one batch
    max_delay_s: float  # the longest an item waits for its batch while the device is busy
    max_queue_size: int  # sequences waiting before `Overloaded`
    max_batch_timesteps: int  # a batch's cost budget, in real time steps
    regroup_fraction: float = 1.0  # of the finished batch's compute time
    regroup_max_s: float = 0.1
    halve: bool = True  # two batches of half the rows in the system (the CPU's best)

    @classmethod
    def of(cls, settings: Settings, serving: ServingSpec, device: torch.device) -> BatchLimits:
        """The limits a server's settings give a model of these serving options on `device`."""
        return cls(
            max_batch_size=serving.max_batch_size,
            max_delay_s=serving.max_delay_ms / 1000.0,
            max_queue_size=serving.max_queue_size,
            max_batch_timesteps=settings.max_batch_timesteps or serving.max_batch_size * 128,
            regroup_fraction=settings.regroup_fraction,
            regroup_max_s=settings.regroup_max_ms / 1000.0,
            halve=device.type == "cpu",
        )


@dataclass(frozen=True, slots=True)
class Row:
    """The result of one sequence: encoding [E] (or [T, E] for pooling "none")."""

    encoding: np.ndarray
    scores: np.ndarray | None = None
    # This row's final state, float32 [L*D, H] per tensor (LSTM: (h, c)), when asked for.
    final_state: HostState | None = None


@dataclass(eq=False, slots=True)
class _Flight:
    """A batch queued on the device: `started` once the device thread took it."""

    batch: list[Item]
    steps: int  # real time steps of the batch (its cost)
    started: bool = False
    started_at: float = 0.0  # time.monotonic() when the device took it


@dataclass(eq=False, slots=True)
class _Request:
    """The items of one `submit` call: their caller is back once the last of them is done."""

    rows: int
    remaining: int


@dataclass(eq=False, slots=True)
class Item:
    """One sequence waiting in a batcher: int64 [T] ids or float32 [T, F] features."""

    sequence: np.ndarray
    future: asyncio.Future[Row]
    pooling: Pooling | None = None
    deadline: float | None = None  # time.monotonic() seconds
    initial_state: HostState | None = None  # this row's state, float32 [L*D, H] per tensor
    return_state: bool = False
    enqueued: float = field(default_factory=time.monotonic)
    length: int = field(init=False)  # time steps of `sequence`
    request: _Request | None = field(default=None, repr=False)  # set by `Batcher.submit`

    def __post_init__(self) -> None:
        self.length = int(self.sequence.shape[0])


class Batcher(Scheduler):
    """Batches the items of one model version and runs them on the device executor."""

    kind = "batcher"
    activity = "computing"

    def __init__(
        self,
        model: str,
        version: int,
        executor: DeviceExecutor,
        compute: EncodeCompute,
        metrics: Metrics,
        limits: BatchLimits,
    ) -> None:
        super().__init__(model, version)
        self.limits = limits
        # Two alternating batches of half the rows pay on the CPU (a batch's cost is per row);
        # on a GPU a batch's host work is the cost, so batches stay as large as allowed.
        self.halve = limits.halve
        self._executor = executor
        self._compute = compute
        self._m_queue = metrics.queue(model, version, "encode")
        self._m_calls = metrics.calls(model, version, "encode")
        self._m_steps = metrics.batch_timesteps.labels(model, str(version))
        self._m_efficiency = metrics.padding_efficiency.labels(model, str(version))
        self._queue: deque[Item] = deque()
        self._queued_steps = 0
        self._flights: list[_Flight] = []  # batches on the device, oldest first (≤ PIPELINE)
        self._population = 0.0  # rows in the system: a decaying maximum, for the target size
        self._batch_seconds = 0.01  # moving average, for the retry hint
        self._step_seconds = 0.0  # moving average of compute seconds per real time step
        # Regrouping after a batch: wait (while the device is idle) until this many rows are
        # queued, but not past `_regroup_until` (time.monotonic()); 0 = no wait.
        self._regroup_rows = 0
        self._regroup_until = 0.0
        self._wakeup: asyncio.Event | None = None

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Create the asyncio objects and the batching task (inside the running loop)."""
        self._wakeup = asyncio.Event()
        self._executor.on_idle(self._wakeup.set)
        self._start_tasks(("batcher", self._run()))

    async def warm_up(self, sequence: np.ndarray) -> None:
        """Run one sequence through the compute path on the device (outside any metric)."""
        future: asyncio.Future[Row] = asyncio.get_running_loop().create_future()
        prepared = self._compute.prepare([Item(sequence, future)])
        await self._executor.run(self._compute.run, prepared)

    @property
    def queue_depth(self) -> int:
        """Sequences admitted and not yet in a batch."""
        return len(self._queue)

    # -- the life (service/core/lifecycle.py) -------------------------------------------------

    def _empty(self) -> bool:
        return not self._queue and not self._flights

    def _wake(self) -> None:
        assert self._wakeup is not None
        self._wakeup.set()

    def _fail_waiting(self, error: ServiceError) -> None:
        # NOTE: batches on the device still end (their executor callbacks deliver them).
        self._fail_queued(error)

    def _fail_everything(self, error: ServiceError) -> None:
        # NOTE: a batch still computing is left to end on its own; its callers hear `error` now.
        self._fail_queued(error)
        for flight in self._flights:
            _fail(flight.batch, error)

    async def stop(self, error: ServiceError | None = None) -> None:
        """Stop at once: queued items and those of batches still on the device fail with
        `error` (default `Draining`); a batch still computing is left to end on its own."""
        if self._wakeup is not None:
            self._executor.remove_idle_listener(self._wakeup.set)
        await super().stop(error)

    # -- admission -------------------------------------------------------------------------

    def submit(self, items: list[Item]) -> None:
        """Admit all of `items` or none: `Overloaded` when the queue cannot take them."""
        self._check_admitting()
        if len(self._queue) + len(items) > self.limits.max_queue_size:
            batches_ahead = len(self._queue) / self.limits.max_batch_size + 1
            raise Overloaded(
                f"model {self.model} version {self.version}: queue full "
                f"({len(self._queue)} of {self.limits.max_queue_size} sequences waiting)",
                retry_after_s=round(max(0.05, self._batch_seconds * batches_ahead), 3),
            )
        request = _Request(len(items), len(items))
        for item in items:
            item.request = request
            self._queue.append(item)
            self._queued_steps += item.length
        self._m_queue.depth.set(len(self._queue))
        assert self._wakeup is not None
        # NOTE: the batching task runs after every caller scheduled in this loop turn, so
        # requests that arrive together start together.
        self._wakeup.set()

    # -- the batching task -----------------------------------------------------------------

    def target_size(self) -> int:
        """Rows the next batch aims for: half the rows in the system, at most max_batch_size
        (max_batch_size when not halving)."""
        if not self.halve:
            return self.limits.max_batch_size
        rows = max(self._population, self._rows_in_system())
        return max(1, min(self.limits.max_batch_size, -(-int(rows) // 2)))

    def _rows_in_system(self) -> int:
        return sum(len(f.batch) for f in self._flights) + len(self._queue)

    def _full(self) -> bool:
        return (
            len(self._queue) >= self.limits.max_batch_size
            or self._queued_steps >= self.limits.max_batch_timesteps
        )

    def _wait_until(self) -> float | None:
        """When the queued items should start (time.monotonic()); None = now."""
        if self._full():
            return None
        now = time.monotonic()
        if self._flights:
            # Our batch computes: the next one goes behind it at its target size, or just before
            # the running one should end (it could not start sooner, so max_delay does not
            # apply: closing early would only split the callers into more, smaller batches).
            if len(self._queue) >= self.target_size():
                return None
            running = self._flights[-1]
            expected = running.steps * self._step_seconds
            close_at = running.started_at + expected - min(HANDOVER_S, 0.1 * expected)
            return close_at if now < close_at else None
        if not self._executor.idle:
            close_at = self._queue[0].enqueued + self.limits.max_delay_s
            return close_at if now < close_at else None
        wanted = min(self._regroup_rows, self.target_size())
        if len(self._queue) < wanted and now < self._regroup_until and not self._closed:
            return self._regroup_until
        return None

    async def _run(self) -> None:
        assert self._wakeup is not None
        while True:
            if not self._queue or not self._may_dispatch():
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            until = self._wait_until()
            if until is not None:
                self._wakeup.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(max(0.0, until - time.monotonic())):
                        await self._wakeup.wait()
                continue
            self._dispatch()

    def _may_dispatch(self) -> bool:
        # NOTE: a batch of ours still waiting for the device blocks the next one: items keep
        # joining it instead (queued behind it, they would run no sooner).
        return len(self._flights) < PIPELINE and all(f.started for f in self._flights)

    def _dispatch(self) -> None:
        """Take the next batch and queue it on the device; `_complete` delivers its results."""
        self._regroup_rows = 0
        batch = self._take(min(self.limits.max_batch_size, max(MIN_SPLIT, self.target_size())))
        if not batch:
            return
        flight = _Flight(batch, sum(item.length for item in batch))
        self._flights.append(flight)
        # NOTE: once the flight is listed, whatever fails must end it (`_complete`): a flight
        # never started blocks every later batch.
        try:
            self._population = max(self._rows_in_system(), 0.9 * self._population)
            now = time.monotonic()
            self._m_queue.waited.observe_many([now - item.enqueued for item in batch])
            loop = asyncio.get_running_loop()
            wakeup = self._wakeup
            assert wakeup is not None
            prepared = self._compute.prepare(batch)

            def compute(prepared: EncodeBatch) -> BatchOutput:
                # NOTE: on the device thread. A flag the loop reads; the loop is woken only when
                # a next batch waits for this one to start.
                flight.started_at = time.monotonic()
                flight.started = True
                if self._queue:
                    loop.call_soon_threadsafe(wakeup.set)
                return self._compute.run(prepared)

            def done(result: tuple[BatchOutput, float] | None, exc: BaseException | None) -> None:
                self._complete(flight, result, exc, prepared)

            self._executor.submit(compute, done, prepared)
        except BaseException as exc:
            self._complete(flight, None, exc)

    def _complete(
        self,
        flight: _Flight,
        result: tuple[BatchOutput, float] | None,
        exc: BaseException | None,
        prepared: EncodeBatch | None = None,
    ) -> None:
        """On the loop, as soon as a batch ends: deliver its rows (or its error)."""
        self._flights.remove(flight)
        batch = flight.batch
        assert self._wakeup is not None
        self._wakeup.set()
        try:
            rows: list[Row] | None = None
            if exc is None and result is not None and prepared is not None:
                try:
                    rows = self._compute.rows(prepared, result[0])
                except Exception as error:
                    exc = error
                if rows is not None and len(rows) != len(batch):
                    exc = RuntimeError(f"{len(rows)} results for {len(batch)} sequences")
            if exc is not None or rows is None or result is None:
                self._fail_batch(batch, exc)
            else:
                self._deliver(flight, rows, result[1])
        except Exception:
            # NOTE: never leave a caller waiting, whatever went wrong here.
            log.exception(
                "model %s version %s: delivering a batch failed", self.model, self.version
            )
            _fail(batch, ComputeError(f"model {self.model} version {self.version}: internal error"))
        self._check_emptied()

    def _take(self, size: int) -> list[Item]:
        """Pop the next batch (FIFO up to `size` and the cost limit), dropping dead items."""
        now = time.monotonic()
        batch: list[Item] = []
        steps = 0
        while self._queue and len(batch) < size:
            item = self._queue[0]
            if batch and steps + item.length > self.limits.max_batch_timesteps:
                break
            self._queue.popleft()
            self._queued_steps -= item.length
            if not self._drop_if_dead(item, now):
                batch.append(item)
                steps += item.length
        self._m_queue.depth.set(len(self._queue))
        self._check_emptied()
        return batch

    def purge(self) -> None:
        """Drop queued items that expired or whose client has gone (frees their queue space)."""
        now = time.monotonic()
        alive: deque[Item] = deque()
        for item in self._queue:
            if not self._drop_if_dead(item, now):
                alive.append(item)
        self._queue = alive
        self._queued_steps = sum(item.length for item in alive)
        self._m_queue.depth.set(len(alive))
        self._check_emptied()

    def _drop_if_dead(self, item: Item, now: float) -> bool:
        # NOTE: the deadline is checked first: a waiter that gave up at its deadline has also
        # cancelled its future, and that drop is a deadline, not a client gone.
        if item.deadline is not None and item.deadline <= now:
            self._m_queue.dropped_deadline.inc()
            if not item.future.done():
                item.future.set_exception(
                    DeadlineExceeded(
                        f"deadline passed after {now - item.enqueued:.3f} s in the queue "
                        f"of model {self.model} version {self.version}; not computed"
                    )
                )
            return True
        if item.future.done():
            self._m_queue.dropped_cancelled.inc()
            return True
        return False

    def _fail_batch(self, batch: list[Item], exc: BaseException | None) -> None:
        log.error("model %s version %s: batch failed", self.model, self.version, exc_info=exc)
        error = (
            exc
            if isinstance(exc, ServiceError)
            else ComputeError(
                f"model {self.model} version {self.version} failed on a batch of "
                f"{len(batch)}: {type(exc).__name__}"
            )
        )
        _fail(batch, error)

    def _deliver(self, flight: _Flight, rows: list[Row], seconds: float) -> None:
        batch = flight.batch
        self._batch_seconds = 0.8 * self._batch_seconds + 0.2 * seconds
        per_step = seconds / max(1, flight.steps)
        self._step_seconds = (
            per_step if not self._step_seconds else (0.8 * self._step_seconds + 0.2 * per_step)
        )
        self._observe(flight, seconds)
        returning = 0
        for item, row in zip(batch, rows, strict=True):
            if not item.future.done():
                item.future.set_result(row)
            request = item.request
            if request is not None:
                request.remaining -= 1
                if request.remaining == 0:
                    returning += request.rows
        self._plan_regroup(returning, seconds)

    def _plan_regroup(self, returning: int, seconds: float) -> None:
        """After a batch that completed requests of `returning` rows in `seconds` of compute:
        expect those callers back, and let the next batch wait a bounded time for them."""
        # NOTE: the wait is bounded by a fraction of the batch's own compute time, so that even
        # when nobody comes back the device stays busy ≥ 1 / (1 + fraction) of the time; a
        # lone caller (batch of 1, nothing queued) expects 1 row, finds it, and never waits.
        wait = min(self.limits.regroup_fraction * seconds, self.limits.regroup_max_s)
        if self._closed or returning == 0 or wait <= 0:
            self._regroup_rows = 0
            return
        self._regroup_rows = min(self.limits.max_batch_size, len(self._queue) + returning)
        self._regroup_until = time.monotonic() + wait

    def _observe(self, flight: _Flight, seconds: float) -> None:
        batch, real = flight.batch, flight.steps
        computed = max(item.length for item in batch) * len(batch)
        self._m_calls.observe(seconds, len(batch))
        self._m_steps.observe(real)
        self._m_efficiency.observe(real / computed)

    def _fail_queued(self, error: ServiceError) -> None:
        _fail(self._queue, error)
        self._queue.clear()
        self._queued_steps = 0
        self._m_queue.depth.set(0)
        self._check_emptied()


def _fail(items: Iterable[Item], error: BaseException) -> None:
    """`error` to every item whose caller still waits."""
    for item in items:
        if not item.future.done():
            item.future.set_exception(error)


# -- the model call (prepared on the loop, run on the device thread) --------------------------


def _stack_states(rows: list[HostState | None], count: int, shape: tuple[int, int]) -> State:
    """Per-row host states ([L*D, H] per tensor, or None = zeros) → a batch state [L*D, N, H]
    (`count` tensors: 2 for an LSTM) as CPU tensors."""
    states, hidden = shape
    parts = []
    for k in range(count):
        if all(row is not None for row in rows):
            # NOTE: the usual streaming batch (every row carries a state): `np.array` stacks
            # in C ([N, L*D, H]); `np.stack` runs Python per row.
            batch = np.array([row[k] for row in rows if row is not None], np.float32)
            parts.append(torch.from_numpy(batch).transpose(0, 1).contiguous())
            continue
        zeros = np.zeros((states, len(rows), hidden), np.float32)
        for j, row in enumerate(rows):
            if row is not None:
                zeros[:, j] = row[k]
        parts.append(torch.from_numpy(zeros))
    return (parts[0], parts[1]) if count == 2 else parts[0]


@dataclass(eq=False, slots=True)
class EncodeBatch:
    """A batch ready for the device: its rows sorted by length (longest first), on the host."""

    items: list[Item]  # in the caller's order
    order: list[int]  # order[position] = index in `items` of the row at `position`
    # [N, T, F] float32 or [N, T] int64, CPU; None = padded on the device thread (large batches)
    inputs: Tensor | None
    lengths: Tensor  # [N] int64, CPU
    initial: State | None  # [L*D, N, H] per tensor, CPU; None = zeros
    poolings: set[Pooling]  # the poolings the rows asked for
    return_state: bool  # any row wants its final state


@dataclass(eq=False, slots=True)
class BatchOutput:
    """A batch's results on the host, rows in the batch's (sorted) order."""

    pooled: dict[str, np.ndarray]  # pooling → [N, E] ([N, T, E] for "none")
    scores: np.ndarray | None  # [N, S]
    final_state: list[np.ndarray]  # [L*D, N, H] per tensor, when a row asked for it


class EncodeCompute:
    """The model call of an `EncoderModel` on `device`, in three stages so that the device thread
    runs (almost) only torch: `prepare` and `rows` do the per-row host work on the event loop,
    `run` calls the model on the device thread.

    All rows run in one model call, sorted by length (longest first); when the rows ask for
    different poolings, the call keeps every step ("none") and each row is pooled after.
    """

    # NOTE: why the split. Python on the device thread is slow twice over: a busy event loop
    # takes the GIL from it every switch interval, and while it holds the GIL the loop waits.
    # On the loop, that work overlaps the other batch's compute, which releases the GIL
    # (`python -m bench.sessions`: batches of streamed chunks, per-row work at its largest).

    def __init__(
        self, model: EncoderModel, device: torch.device, dtype: torch.dtype, sizes: tuple[int, int]
    ) -> None:
        """`sizes` = (layers × directions, hidden) of the encoder state."""
        self.model = model
        self.device = device
        self.dtype = dtype
        self.sizes = sizes
        self._is_lstm = model.config.encoder.cell == "lstm"
        self._on_host = device.type == "cpu" and dtype == torch.float32

    def prepare(self, items: list[Item]) -> EncodeBatch:
        """On the loop: sort the rows, pad their inputs (unless the padded batch is large) and
        stack their initial states."""
        order = sorted(range(len(items)), key=lambda i: -items[i].length)
        chosen = [items[i] for i in order]
        first = chosen[0].sequence
        padded_bytes = len(chosen) * first.nbytes  # the longest row first: the padded batch
        inputs: Tensor | None = None
        if padded_bytes <= PAD_ON_LOOP_BYTES:
            inputs, lengths = collate([item.sequence for item in chosen])
        else:
            lengths = torch.tensor([item.length for item in chosen], dtype=torch.int64)
        initial = None
        if any(item.initial_state is not None for item in chosen):
            initial = _stack_states(
                [item.initial_state for item in chosen], 2 if self._is_lstm else 1, self.sizes
            )
        default = self.model.config.pooling
        return EncodeBatch(
            items,
            order,
            inputs,
            lengths,
            initial,
            {item.pooling or default for item in chosen},
            any(item.return_state for item in chosen),
        )

    def run(self, batch: EncodeBatch) -> BatchOutput:
        """On the device thread: the model call, its outputs copied to the host."""
        # NOTE: every torch call gives up the GIL and takes it back, and a busy event loop makes
        # each take-back wait (up to the switch interval): conversions that change nothing are
        # skipped.
        initial = batch.initial
        if initial is not None:
            initial = (
                (self._placed(initial[0]), self._placed(initial[1]))
                if isinstance(initial, tuple)
                else self._placed(initial)
            )
        shared = next(iter(batch.poolings)) if len(batch.poolings) == 1 else "none"
        inputs = batch.inputs
        if inputs is None:
            # NOTE: a large copy, here rather than on the loop: numpy releases the GIL for it.
            inputs, _ = collate([batch.items[i].sequence for i in batch.order])
        out = self.model(
            self._placed(inputs), batch.lengths, shared, initial, return_state=batch.return_state
        )
        pooled: dict[str, np.ndarray] = {shared: self._host(out.encodings)}
        if shared == "none":
            for pooling in batch.poolings - {"none"}:
                pooled[pooling] = self._host(pool(out.encodings, batch.lengths, out.final, pooling))
        # NOTE: the head always reads the config's default pooling, whatever a row asked.
        scores = self._host(out.scores) if out.scores is not None else None
        final_state: list[np.ndarray] = []
        if batch.return_state:
            state = out.final_state
            assert state is not None
            final_state = [self._host(t) for t in (state if isinstance(state, tuple) else (state,))]
        return BatchOutput(pooled, scores, final_state)

    def rows(self, batch: EncodeBatch, output: BatchOutput) -> list[Row]:
        """On the loop: each item's row, in the items' order."""
        default = self.model.config.pooling
        results: list[Row | None] = [None] * len(batch.items)
        for position, index in enumerate(batch.order):
            item = batch.items[index]
            pooling = item.pooling or default
            encoding = output.pooled[pooling][position]
            if pooling == "none":
                encoding = encoding[: item.length]
            results[index] = Row(
                encoding=encoding,
                scores=output.scores[position] if output.scores is not None else None,
                # NOTE: a row's own copy: a view would keep the whole batch's state alive for
                # as long as any one session holds its state.
                final_state=tuple(a[:, position].copy() for a in output.final_state)
                if item.return_state
                else None,
            )
        return [row for row in results if row is not None]

    def _placed(self, tensor: Tensor) -> Tensor:
        """A float tensor in the model's device and dtype (int64 token ids keep their dtype)."""
        if self._on_host or (not tensor.is_floating_point() and self.device.type == "cpu"):
            return tensor
        if tensor.is_floating_point():
            return tensor.to(self.device, self.dtype)
        return tensor.to(self.device)

    def _host(self, tensor: Tensor) -> np.ndarray:
        """`tensor` as a C-contiguous float32 host array.

        NOTE: C order is part of the contract with the front-ends (their rows are slices of
        it, and orjson writes only C-contiguous arrays): the recurrent layer's equal-length path
        hands back a transposed view, copied here on the device thread (numpy releases the GIL).
        """
        array = tensor.numpy() if self._on_host else tensor.float().cpu().numpy()
        return np.ascontiguousarray(array)
