"""`DeviceExecutor`: the one compute thread of a device; the event loop never blocks on a model.

Every model call of a device (encode batches, decode steps, warm-up) runs here, one at a time and
in submission order, under `torch.inference_mode()`. Batchers ask `idle` to decide whether to run
at once (no idle waiting) and subscribe to `on_idle` to hear when the device frees up; decode
bursts ask `pending` to give the device back when other work waits.

The worker is a daemon thread: a model call cannot be interrupted, so shutdown waits for the
running one only as long as it is told to (`shutdown(timeout_s)`), and the process may exit
with it still running (`service.process.serve` then ends the process without joining it).
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import torch

T = TypeVar("T")
# Every compute thread's name starts so (service/process/serve.py looks for those still running at
# exit).
COMPUTE_THREAD_PREFIX = "rnnserve-"
# Called on the loop when a submitted call ends: ((result, seconds), None) or (None, exception).
Done = Callable[[tuple[T, float] | None, BaseException | None], None]


class DeviceExecutor:
    """A single worker thread per device; `run` awaits a call made on it."""

    def __init__(
        self, device: torch.device, threads: int | None = None, name: str | None = None
    ) -> None:
        self.device = device
        self.name = name
        self.threads = threads
        self.calls = 0
        self._pending = 0
        self._queue: queue.SimpleQueue[tuple[Any, ...] | None] | None = None
        self._thread: threading.Thread | None = None
        self._closing = False  # set by `shutdown`: calls not yet started are skipped
        self._idle_listeners: list[Callable[[], None]] = []

    def start(self) -> None:
        """Start the worker thread (idempotent)."""
        if self._thread is None:
            self._closing = False
            self._queue = queue.SimpleQueue()
            self._thread = threading.Thread(
                target=self._work,
                args=(self._queue,),
                name=f"{COMPUTE_THREAD_PREFIX}{self.name or self.device}",
                daemon=True,
            )
            self._thread.start()

    def _work(self, calls: queue.SimpleQueue[tuple[Any, ...] | None]) -> None:
        # NOTE: intra-op threads are set from the worker itself as well: with OpenMP the
        # setting is per calling thread, and this is the only thread that computes.
        if self.threads is not None:
            torch.set_num_threads(self.threads)
        while (call := calls.get()) is not None:
            if not self._closing:
                self._call(*call)

    @property
    def idle(self) -> bool:
        """True when no call is running or waiting on this device."""
        return self._pending == 0

    @property
    def pending(self) -> int:
        """Calls submitted and not finished (running + waiting)."""
        return self._pending

    def on_idle(self, listener: Callable[[], None]) -> None:
        """Call `listener` on the event loop each time the device becomes idle."""
        self._idle_listeners.append(listener)

    def remove_idle_listener(self, listener: Callable[[], None]) -> None:
        """Stop calling `listener`."""
        if listener in self._idle_listeners:
            self._idle_listeners.remove(listener)

    async def run(self, fn: Callable[..., T], *args: object) -> tuple[T, float]:
        """Run `fn(*args)` on the device thread; return its result and its compute seconds."""
        future: asyncio.Future[tuple[T, float]] = asyncio.get_running_loop().create_future()
        self.submit(fn, settle(future), *args)
        return await future

    def submit(self, fn: Callable[..., T], done: Done[T], *args: object) -> None:
        """Queue `fn(*args)` on the device thread; `done((result, seconds), None)` or
        `done(None, exception)` is called on this loop as soon as it ends (no task needed)."""
        if self._queue is None or self._closing:
            raise RuntimeError("DeviceExecutor used before start() or after shutdown()")
        loop = asyncio.get_running_loop()
        self._pending += 1
        self._queue.put((loop, done, fn, args))

    def _call(
        self,
        loop: asyncio.AbstractEventLoop,
        done: Done[T],
        fn: Callable[..., T],
        args: tuple[object, ...],
    ) -> None:
        start = time.perf_counter()
        try:
            with torch.inference_mode():
                result = fn(*args)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
        except BaseException as exc:
            _hand_back(loop, self._finish, done, None, exc)
            return
        self.calls += 1
        _hand_back(loop, self._finish, done, (result, time.perf_counter() - start), None)

    def _finish(
        self, done: Done[T], result: tuple[T, float] | None, exc: BaseException | None
    ) -> None:
        # NOTE: one wake-up of the loop per call. The count drops when the thread is done, not
        # when a waiter is (a cancelled waiter must not make a busy device look idle), and
        # before `done` runs, so that it already sees `idle`.
        self._pending -= 1
        if self._pending == 0:
            for listener in tuple(self._idle_listeners):
                listener()
        done(result, exc)

    def shutdown(self, timeout_s: float | None = None) -> bool:
        """Stop the worker thread: the running call ends, calls not yet started are dropped
        (their waiters were failed by their owners). Waits up to `timeout_s` (None: no limit);
        True when the thread has ended."""
        thread, calls = self._thread, self._queue
        if thread is None or calls is None:
            return True
        self._closing = True
        calls.put(None)
        thread.join(timeout_s)
        self._thread = self._queue = None
        return not thread.is_alive()


def settle(future: asyncio.Future[tuple[T, float]]) -> Done[T]:
    """A `done` callback that hands a call's outcome to `future` (unless it is done already: its
    waiter gave up)."""

    def done(result: tuple[T, float] | None, exc: BaseException | None) -> None:
        if future.done():
            return
        if exc is not None:
            future.set_exception(exc)
        else:
            assert result is not None
            future.set_result(result)

    return done


def _hand_back(loop: asyncio.AbstractEventLoop, callback: Callable[..., None], *args: Any) -> None:
    # NOTE: a call that outlived the server (shutdown stopped waiting for it) finds its loop
    # closed; its result has nobody left to take it.
    try:
        loop.call_soon_threadsafe(callback, *args)
    except RuntimeError:
        if not loop.is_closed():
            raise
