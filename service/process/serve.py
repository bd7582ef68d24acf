"""`rnnserve serve`: one process, one asyncio loop, HTTP (uvicorn) and gRPC on one Engine.

This module owns SIGTERM/SIGINT. On either: readiness goes false at once (gRPC health
NOT_SERVING, /readyz 503 as the engine drains), new work is refused (503 / UNAVAILABLE), open
streams end with UNAVAILABLE, admitted and queued work may finish until the grace less a reserve
(`engine.stop_reserve_s`: half the grace, at most 1 s), what is still running then is answered
503 / UNAVAILABLE naming the shutdown, models unload, both servers stop, and the process exits 0
— all within `drain_grace_s`. A model call still computing then cannot be interrupted: the
process exits without waiting for it (`os._exit` once the logs are flushed).
Both servers start before the models load, so probes see "live, not ready" while loading.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Coroutine, Generator
from typing import Any

import uvicorn
from prometheus_client import CollectorRegistry
from pydantic import ValidationError

from service.core import validation
from service.core.engine import Engine
from service.core.executor import COMPUTE_THREAD_PREFIX
from service.core.metrics import Metrics
from service.core.settings import Settings
from service.grpc_api.server import GrpcServer, create_grpc_server
from service.http_api.app import create_app
from service.http_api.connection import deadline_protocol
from service.process import logging_setup
from service.process.flags import add_settings_flags, settings_from_args

log = logging.getLogger("rnnserve")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`rnnserve serve`'s flags (service/process/flags.py)."""
    parser.description = (
        "Serve a model repository over REST (HTTP) and gRPC. Every flag is also an environment "
        "variable (--http-port = RNNSERVE_HTTP_PORT); a flag given wins."
    )
    add_settings_flags(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Run the server until SIGTERM/SIGINT; returns the exit status."""
    try:
        settings = settings_from_args(args)
    except ValidationError as exc:
        for error in exc.errors():
            where = ".".join(str(p) for p in error["loc"]) or "settings"
            print(f"rnnserve serve: {where}: {validation.pydantic_problem(error)}", flush=True)
        return 2
    logging_setup.configure(settings.log_format, settings.log_level)
    sys.setswitchinterval(settings.gil_switch_interval_us / 1e6)
    code = _run_loop(serve(settings))
    if any(t.name.startswith(COMPUTE_THREAD_PREFIX) for t in threading.enumerate()):
        # NOTE: a model call outlived the drain grace (it cannot be interrupted). Interpreter
        # shutdown beside a thread inside torch may crash or hang; the work is abandoned anyway.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def http_url(host: str, port: int) -> str:
    """The address a person on this machine opens to reach the HTTP server bound to `host`."""
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _run_loop(main: Coroutine[Any, Any, int]) -> int:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


class _HttpServer(uvicorn.Server):
    """uvicorn without its own signal handlers: this module owns the signals."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


async def serve(settings: Settings) -> int:
    """Serve until a stop signal, then drain and stop; returns the exit status."""
    stop = asyncio.Event()
    received: list[str] = []

    def on_signal(sig: signal.Signals) -> None:
        received.append(sig.name)
        stop.set()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        device = str(settings.torch_device())
    except ValueError as exc:
        logging_setup.event(log, "server.failed", level=logging.ERROR, reason=str(exc))
        return 2
    server = _Server(settings)
    if not await server.listen():
        return 1
    start_task = loop.create_task(server.engine.start(), name="engine-start")
    await server.serve_until(stop, start_task, device)
    logging_setup.event(
        log, "server.draining", signal=",".join(received) or None, grace_s=settings.drain_grace_s
    )
    await server.shut_down(start_task)
    failed = not start_task.cancelled() and start_task.exception() is not None
    return 1 if failed else 0


class _Server:
    """The engine and both front-ends of one `serve`, from listening to stopped."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        metrics = Metrics(CollectorRegistry())
        self.engine = Engine(settings, metrics)
        self.http = _HttpServer(
            uvicorn.Config(
                create_app(self.engine, settings, metrics),
                host=settings.host,
                port=settings.http_port,
                log_config=None,
                access_log=False,
                lifespan="off",
                http=deadline_protocol(
                    settings.http_header_timeout_s, settings.http_body_timeout_s
                ),
            )
        )
        self.grpc: GrpcServer = create_grpc_server(self.engine, settings, metrics)
        self.http_task: asyncio.Task[None] | None = None
        self.http_port = 0
        self.grpc_port = 0

    async def listen(self) -> bool:
        """Start both servers (gRPC first); False (logged `server.failed`) when one cannot."""
        try:
            self.grpc_port = await self.grpc.start()
        except OSError as exc:
            logging_setup.event(log, "server.failed", level=logging.ERROR, reason=str(exc))
            return False
        http = self.http
        self.http_task = asyncio.get_running_loop().create_task(_serve_http(http), name="http")
        # NOTE: uvicorn offers no "started" event to await; `started` flips once its sockets listen.
        while not http.started and not self.http_task.done():  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        if not http.started:
            done = self.http_task.done()
            reason = self.http_task.exception() if done else None
            logging_setup.event(
                log,
                "server.failed",
                level=logging.ERROR,
                reason=str(reason or "HTTP did not start"),
            )
            await self.grpc.stop(0)
            return False
        self.http_port = http.servers[0].sockets[0].getsockname()[1]
        logging_setup.event(
            log,
            "server.listening",
            host=self.settings.host,
            http_port=self.http_port,
            grpc_port=self.grpc_port,
        )
        return True

    async def serve_until(
        self, stop: asyncio.Event, start_task: asyncio.Task[None], device: str
    ) -> None:
        """Wait for the engine to start (then `server.ready`) and for a stop signal; a failed
        start (`server.failed`) stops at once."""
        started = time.perf_counter()
        stop_task = asyncio.get_running_loop().create_task(stop.wait())
        await asyncio.wait({start_task, stop_task}, return_when=asyncio.FIRST_COMPLETED)
        if start_task.done() and start_task.exception() is None:
            # NOTE: what is allocated by now (modules, models, app) lives as long as the process;
            # frozen, out of the collector's sight, a full collection no longer walks it (and
            # pauses the loop; `python -m bench.sessions`).
            gc.collect()
            gc.freeze()
            await self.grpc.refresh_health()
            self._log_ready(device, round(time.perf_counter() - started, 3))
            await stop_task
        elif start_task.done():
            reason = str(start_task.exception())
            logging_setup.event(log, "server.failed", level=logging.ERROR, reason=reason)
            stop.set()

    def _log_ready(self, device: str, startup_s: float) -> None:
        engine = self.engine
        models = [
            {"name": m.name, "version": v.version, "state": v.state, "load_s": v.load_seconds}
            | ({"reason": v.reason} if v.reason else {})
            for m in engine.list_models()
            for v in m.versions
        ]
        logging_setup.event(
            log,
            "server.ready" if engine.ready else "server.started_not_ready",
            host=self.settings.host,
            http_port=self.http_port,
            grpc_port=self.grpc_port,
            docs=f"{http_url(self.settings.host, self.http_port)}/docs",
            device=device,
            startup_s=startup_s,
            models=models,
        )

    async def shut_down(self, start_task: asyncio.Task[None]) -> None:
        """Drain within the grace: the engine's work first, the servers with what is left."""
        grace = self.settings.drain_grace_s
        drain_started = time.perf_counter()
        await self.grpc.begin_drain()
        if not start_task.done():
            start_task.cancel()
            await asyncio.gather(start_task, return_exceptions=True)
        # NOTE: the engine ends its work within the grace less a reserve; the servers get the rest.
        await self.engine.drain(grace)
        left = max(0.05, grace - (time.perf_counter() - drain_started) - 0.05)
        self.http.config.timeout_graceful_shutdown = left  # type: ignore[assignment]
        self.http.should_exit = True
        assert self.http_task is not None
        await asyncio.gather(self.http_task, self.grpc.stop(left), return_exceptions=True)
        logging_setup.event(
            log,
            "server.stopped",
            drain_s=round(time.perf_counter() - drain_started, 3),
            compute_finished=self.engine.threads_done,
        )


async def _serve_http(http: uvicorn.Server) -> None:
    try:
        await http.serve()
    except SystemExit as exc:
        # NOTE: uvicorn exits the process when it cannot bind; here that is a startup failure.
        raise OSError(
            f"HTTP cannot bind {http.config.host}:{http.config.port} (uvicorn exit {exc.code})"
        ) from None
