"""A client gone before its answer: the engine work it started is cancelled (the batcher then
drops its queued items before compute: work whose client has gone is never computed).

Under the server's own HTTP protocol (service/http_api/connection.py) the connection itself
cancels the request's task when it is lost: no task per request. Under any other ASGI server a
watcher task per request waits for `http.disconnect`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Protocol, TypeVar

from fastapi import Request

_T = TypeVar("_T")

# The scope key under which the server's connection offers itself to watch requests.
CONNECTION = "rnnserve.connection"


class ClientDisconnectedError(Exception):
    """The client closed the connection before its answer was ready (the work was cancelled)."""


class Connection(Protocol):
    """A connection that cancels the tasks it watches when it is lost."""

    def watch(self, task: asyncio.Task[object]) -> None:
        """Cancel `task` when the connection is lost (now, if it is already)."""

    def unwatch(self, task: asyncio.Task[object]) -> bool:
        """Stop watching `task`; whether the connection's loss cancelled it."""
        ...


async def unless_disconnected(request: Request, work: Awaitable[_T]) -> _T:
    """Await `work`, cancelling it when the client disconnects first.

    The engine then drops the request's queued items before compute (DESIGN §3: work whose
    client has gone is never computed). Call after the body has been read.
    """
    current = asyncio.current_task()
    assert current is not None
    connection: Connection | None = request.scope.get(CONNECTION)
    if connection is None:
        return await _watched(request, work, current)
    connection.watch(current)
    try:
        return await work
    except asyncio.CancelledError:
        if connection.unwatch(current):
            current.uncancel()
            raise ClientDisconnectedError from None
        raise
    finally:
        connection.unwatch(current)


async def _watched(request: Request, work: Awaitable[_T], current: asyncio.Task[_T]) -> _T:
    # NOTE: `work` runs in this task; one watcher task cancels it on disconnect (cheaper than
    # racing two tasks with asyncio.wait on every request).
    watcher = asyncio.ensure_future(_disconnected(request))

    def gone(done: asyncio.Future[None]) -> None:
        if done.cancelled():
            return
        done.exception()  # NOTE: a failed receive is a broken connection: the client is gone too
        current.cancel()

    watcher.add_done_callback(gone)
    try:
        return await work
    except asyncio.CancelledError:
        if watcher.done() and not watcher.cancelled():
            current.uncancel()
            raise ClientDisconnectedError from None
        raise
    finally:
        watcher.cancel()


async def _disconnected(request: Request) -> None:
    # NOTE: once the body is read, the server's receive() only returns on disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass
