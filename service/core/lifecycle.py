"""What the encode batcher and the decode scheduler share: the life of a per-version scheduler.

Both own background tasks on the event loop and the requests they admitted. Their life:
- `start` (inside the running loop) creates the tasks; a task ends only when `stop` cancels it;
- any other end of a task (an exception, a stray cancellation: a bug) stops the others, fails
  the waiting work with a retryable `NotReady`, refuses new work, and calls `on_failure(reason)`
  so that the owner (the registry) restarts the version;
- `drain(deadline)` stops admitting and lets admitted work finish until the deadline, then
  `stop(Draining)` fails what is left;
- `stop(error)` fails what is queued or running with `error` at once.
"""

from __future__ import annotations

import asyncio
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Coroutine
from typing import Any, ClassVar

from service.core.errors import Draining, NotReady, ServiceError

log = logging.getLogger(__name__)


class Scheduler(ABC):
    """The shared life of one model version's batcher or decode scheduler (see the module)."""

    # What it is called in messages ("its batcher stopped") and what its work is doing
    # ("was still computing this request").
    kind: ClassVar[str]
    activity: ClassVar[str]

    def __init__(self, model: str, version: int) -> None:
        self.model = model
        self.version = version
        # Called with the reason when a task ends on its own (the owner restarts the version).
        self.on_failure: Callable[[str], None] | None = None
        self._closed = False  # admits nothing more
        # `stop` began, or a task failed: every task's end is expected from now on. The device
        # thread reads it too (a decode burst ends at its next step).
        self._stopping = False
        self._failure: str | None = None  # why a task ended on its own
        self._tasks: list[asyncio.Task[None]] = []
        self._emptied: asyncio.Event | None = None  # set when nothing is queued or running

    # -- what each scheduler provides --------------------------------------------------------

    @abstractmethod
    def _empty(self) -> bool:
        """Nothing admitted is waiting or running."""

    @abstractmethod
    def _wake(self) -> None:
        """Wake the tasks (a drain wants the admitted work to go on without new arrivals)."""

    @abstractmethod
    def _fail_waiting(self, error: ServiceError) -> None:
        """Fail the work that waits for a task (a task died: nobody will take it)."""

    @abstractmethod
    def _fail_everything(self, error: ServiceError) -> None:
        """Fail every request admitted and not answered (on `stop`)."""

    # -- the life ------------------------------------------------------------------------------

    def _start_tasks(self, *tasks: tuple[str, Coroutine[Any, Any, None]]) -> None:
        """Create the tasks (name, coroutine) inside the running loop."""
        loop = asyncio.get_running_loop()
        self._emptied = asyncio.Event()
        for name, coroutine in tasks:
            task = loop.create_task(coroutine, name=f"{name}-{self.model}-{self.version}")
            task.add_done_callback(self._task_done)
            self._tasks.append(task)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        if self._stopping:
            return
        reason = "cancelled" if task.cancelled() else repr(task.exception())
        log.error(
            "model %s version %s: %s stopped: %s", self.model, self.version, self.kind, reason
        )
        self._failure = f"its {self.kind} stopped ({reason})"
        self._closed = True
        self._stopping = True
        for other in self._tasks:
            if other is not task:
                other.cancel()
        self._fail_waiting(self._not_ready())
        if self.on_failure is not None:
            self.on_failure(self._failure)

    def _not_ready(self) -> NotReady:
        return NotReady(
            f"model {self.model} version {self.version} is not serving: {self._failure}; "
            "it is being restarted, retry shortly"
        )

    @property
    def failure(self) -> str | None:
        """Why the scheduler stopped on its own (None while it runs or after `stop`)."""
        return self._failure

    def _check_admitting(self) -> None:
        """Refuse new work once failed (NotReady: retry) or closed (Draining)."""
        if self._failure is not None:
            raise self._not_ready()
        if self._closed:
            raise Draining(f"model {self.model} version {self.version} is not taking requests")

    def _check_emptied(self) -> None:
        # NOTE: `drain` waits on this event instead of polling.
        if self._emptied is not None and self._empty():
            self._emptied.set()

    async def drain(self, deadline: float | None = None) -> bool:
        """Stop admitting; finish every admitted request, until `deadline` (loop time; None: no
        limit); then stop, failing what is left with `Draining`. True if nothing was left."""
        self._closed = True
        assert self._emptied is not None
        finished = True
        try:
            async with asyncio.timeout_at(deadline):
                while not self._empty() and self._failure is None:
                    self._wake()
                    self._emptied.clear()
                    await self._emptied.wait()
        except TimeoutError:
            finished = False
        await self.stop(
            Draining(
                f"the server is shutting down: model {self.model} version {self.version} was "
                f"still {self.activity} this request when the drain grace ended"
            )
        )
        return finished

    async def stop(self, error: ServiceError | None = None) -> None:
        """Stop at once: what is queued or running fails with `error` (default `Draining`)."""
        self._closed = True
        self._stopping = True
        for task in self._tasks:
            task.cancel()
        # NOTE: a task that ended on its own is not raised again here (its failure was handled).
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        self._fail_everything(
            error or Draining(f"model {self.model} version {self.version} is unloading")
        )
