"""A client gone before its answer: the engine work it started is cancelled (the batcher then
drops its queued items before compute: work whose client has gone is never computed)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

from fastapi import Request

_T = TypeVar("_T")


class ClientDisconnectedError(Exception):
    """The client closed the connection before its answer was ready (the work was cancelled)."""


async def unless_disconnected(request: Request, work: Awaitable[_T]) -> _T:
    """Await `work`, cancelling it when the client disconnects first.

    The engine then drops the request's queued items before compute (DESIGN §3: work whose
    client has gone is never computed). Call after the body has been read.
    """
    # NOTE: `work` runs in this task; one watcher task cancels it on disconnect (cheaper than
    # racing two tasks with asyncio.wait on every request).
    current = asyncio.current_task()
    assert current is not None
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
