"""Addresses, round-robin with fail-over, and the retry plan of one call (no I/O here).

Each call starts at the next address (round-robin over the list). A call that fails with a
retriable error — the server could not take it (Unavailable: not ready, draining, no
connection) or its queue was full (Overloaded) — goes on to the next address; the failing one
rests for a backoff that doubles with each failure in a row (50 ms up to 2 s), and for at
least the Retry-After an Overloaded refusal names, so that later calls skip it too. When every
address is resting, the call waits for the first to come back, but never past its deadline:
then it raises the last error. Anything else (bad input, unknown model, deadline) is raised at
once.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlsplit

from rnnserve_client import errors

Scheme = Literal["http", "grpc"]
DEFAULT_PORTS: dict[str, int] = {"http": 8000, "grpc": 8001}
# Unavailable addresses rest for this long, doubling on each failure in a row, up to the cap.
FIRST_BACKOFF_S = 0.05
MAX_BACKOFF_S = 2.0


@dataclass(frozen=True)
class Address:
    """One server: `http://host:port` (REST) or `grpc://host:port` (gRPC)."""

    scheme: Scheme
    host: str
    port: int

    @property
    def netloc(self) -> str:
        """`host:port` (`[host]:port` for an IPv6 host)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.netloc}"


def parse_address(url: str) -> Address:
    """`http://host[:port]` or `grpc://host[:port]` (ports default to 8000 and 8001)."""
    parts = urlsplit(url)
    if parts.scheme not in DEFAULT_PORTS or not parts.hostname:
        raise ValueError(f"{url!r}: an address is http://host:port or grpc://host:port")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"{url!r}: an address has no path, query or fragment")
    scheme: Scheme = "http" if parts.scheme == "http" else "grpc"
    return Address(scheme, parts.hostname, parts.port or DEFAULT_PORTS[scheme])


def parse_addresses(urls: str | list[str] | tuple[str, ...]) -> list[Address]:
    """One address or a list of them (no duplicates)."""
    listed = [urls] if isinstance(urls, str) else list(urls)
    if not listed:
        raise ValueError("give at least one address")
    addresses = [parse_address(url) for url in listed]
    if len(set(addresses)) != len(addresses):
        raise ValueError(f"an address is listed twice: {listed}")
    return addresses


class Rotation:
    """The addresses of one client: whose turn it is, and which are resting until when.
    Shared by every call of the client (thread-safe)."""

    def __init__(self, count: int) -> None:
        self._count = count
        self._next = 0
        self._resting_until = [0.0] * count
        self._failures = [0] * count
        self._lock = threading.Lock()

    def start(self) -> int:
        """The address a new call starts at: the next one in turn that is not resting (or the
        next in turn when all are)."""
        with self._lock:
            now = time.monotonic()
            for step in range(self._count):
                index = (self._next + step) % self._count
                if self._resting_until[index] <= now:
                    break
            else:
                index = self._next
            self._next = (index + 1) % self._count
            return index

    def succeeded(self, index: int) -> None:
        """`index` answered: its backoff starts again from the beginning."""
        with self._lock:
            self._failures[index] = 0

    def rest(self, index: int, error: errors.RnnserveError) -> None:
        """`index` refused or failed with a retriable `error`: skip it for a while."""
        with self._lock:
            pause = min(MAX_BACKOFF_S, FIRST_BACKOFF_S * 2 ** self._failures[index])
            self._failures[index] += 1
            if isinstance(error, errors.Overloaded):
                # NOTE: never sooner than the server asked; later when it keeps refusing.
                pause = max(pause, error.retry_after_s)
            self._resting_until[index] = max(self._resting_until[index], time.monotonic() + pause)

    def after(self, index: int) -> tuple[int, float]:
        """The address to try after `index` failed, and how long to wait before trying it:
        the next one not resting, else the one that comes back first."""
        with self._lock:
            now = time.monotonic()
            order = [(index + step) % self._count for step in range(1, self._count + 1)]
            for candidate in order:
                if self._resting_until[candidate] <= now:
                    return candidate, 0.0
            soonest = min(order, key=lambda i: self._resting_until[i])
            return soonest, self._resting_until[soonest] - now


class Plan:
    """The retry plan of one call: its deadline, the address of its next attempt, and how many
    attempts it has made. A client drives it so:

        plan = Plan(rotation, timeout_s, max_attempts)
        while True:
            with plan.attempt() as remaining:
                return send(plan.index, remaining)
            sleep(plan.wait)
    """

    def __init__(self, rotation: Rotation, timeout_s: float | None, max_attempts: int) -> None:
        self.rotation = rotation
        self.deadline = None if timeout_s is None else time.monotonic() + timeout_s
        self.max_attempts = max_attempts
        self.attempts = 0
        # The address of the next attempt, and how long to wait before making it.
        self.index = rotation.start()
        self.wait = 0.0

    def remaining(self) -> float | None:
        """Seconds left before the call's deadline (None: no deadline)."""
        return None if self.deadline is None else self.deadline - time.monotonic()

    @contextlib.contextmanager
    def attempt(self) -> Iterator[float | None]:
        """One attempt at `index`, given the seconds left (None: no deadline); DeadlineExceeded
        if none are. An error the block raises is swallowed when another attempt may follow
        (then `index` and `wait` say where and when); a block that ends resets the backoff of
        the address that answered."""
        remaining = self.remaining()
        if remaining is not None and remaining <= 0:
            raise errors.DeadlineExceeded("the call's deadline passed before an answer came")
        self.attempts += 1
        try:
            yield remaining
        except errors.RnnserveError as error:
            if not self._retries(error):
                raise
        else:
            self.rotation.succeeded(self.index)

    def _retries(self, error: errors.RnnserveError) -> bool:
        # Whether `error` at `index` is worth another attempt within the budget: then the
        # next address, and the wait before it, are set.
        if not isinstance(error, errors.RETRIABLE):
            return False
        self.rotation.rest(self.index, error)
        if self.attempts >= self.max_attempts:
            return False
        candidate, wait = self.rotation.after(self.index)
        remaining = self.remaining()
        if remaining is not None and wait >= remaining:
            # NOTE: the server asked for more time than the call has left: answer now.
            return False
        self.index, self.wait = candidate, wait
        return True
