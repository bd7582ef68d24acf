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
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Coroutine, Generator
from typing import Any, get_args, get_origin

import uvicorn
from prometheus_client import CollectorRegistry
from pydantic import ValidationError
from pydantic.fields import FieldInfo

from service import logging_setup, validation
from service.executor import COMPUTE_THREAD_PREFIX
from service.grpc_api import create_grpc_server
from service.http_protocol import deadline_protocol
from service.metrics import Metrics
from service.settings import Settings

log = logging.getLogger("rnnserve")


class _HttpServer(uvicorn.Server):
    """uvicorn without its own signal handlers: service/main.py owns the signals."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _choices(annotation: Any) -> list[str] | None:
    args = [a for a in get_args(annotation) if a is not type(None)]
    if get_origin(annotation) is not None and args and all(isinstance(a, str) for a in args):
        return [str(a) for a in args]
    return None


def _default_text(field: FieldInfo) -> str:
    """A setting's default as `--help` shows it."""
    if field.default_factory is not None:
        value: Any = field.default_factory()  # type: ignore[call-arg]
    else:
        value = field.default
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, dict):
        return json.dumps(value)
    if isinstance(value, int) and value >= 1024 * 1024 and value % (1024 * 1024) == 0:
        return f"{value} ({value // (1024 * 1024)} MiB)"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per Settings field (`--http-port` for `http_port`); each overrides RNNSERVE_*.
    `--help` shows each one's default (or the rule that makes it) and its variable."""
    parser.description = (
        "Serve a model repository over REST (HTTP) and gRPC. Every flag is also an environment "
        "variable (--http-port = RNNSERVE_HTTP_PORT); a flag given wins."
    )
    for name, field in Settings.model_fields.items():
        env = f"RNNSERVE_{name.upper()}"
        description = field.description or ""
        # NOTE: a field whose default is computed says so in its description ("default: ...").
        shown = "" if "default:" in description.lower() else f"default: {_default_text(field)}; "
        help_text = f"{description} [{shown}env {env}]"
        # NOTE: SUPPRESS keeps unset flags out of the namespace, so the environment applies.
        common: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS, "help": help_text}
        annotation = field.annotation
        if annotation is bool:
            parser.add_argument(_flag(name), action=argparse.BooleanOptionalAction, **common)
        elif get_origin(annotation) is dict:
            parser.add_argument(_flag(name), type=json.loads, metavar="JSON", **common)
        else:
            choices = _choices(annotation)
            parser.add_argument(
                _flag(name), choices=choices, metavar=None if choices else name.upper(), **common
            )
    parser.set_defaults(run=run)


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Settings from the environment, overridden by the flags given on the command line."""
    given = {name: value for name, value in vars(args).items() if name in Settings.model_fields}
    return Settings(**given)


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


async def _serve_http(http: uvicorn.Server) -> None:
    try:
        await http.serve()
    except SystemExit as exc:
        # NOTE: uvicorn exits the process when it cannot bind; here that is a startup failure.
        raise OSError(
            f"HTTP cannot bind {http.config.host}:{http.config.port} (uvicorn exit {exc.code})"
        ) from None


async def serve(settings: Settings) -> int:
    """Serve until a stop signal, then drain and stop; returns the exit status."""
    from service.engine import Engine
    from service.rest import create_app

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    received: list[str] = []

    def on_signal(sig: signal.Signals) -> None:
        received.append(sig.name)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)

    try:
        device = str(settings.torch_device())
    except ValueError as exc:
        logging_setup.event(log, "server.failed", level=logging.ERROR, reason=str(exc))
        return 2
    metrics = Metrics(CollectorRegistry())
    engine = Engine(settings, metrics)
    app = create_app(engine, settings, metrics)
    http = _HttpServer(
        uvicorn.Config(
            app,
            host=settings.host,
            port=settings.http_port,
            log_config=None,
            access_log=False,
            lifespan="off",
            http=deadline_protocol(settings.http_header_timeout_s, settings.http_body_timeout_s),
        )
    )
    grpc_server = create_grpc_server(engine, settings, metrics)

    try:
        grpc_port = await grpc_server.start()
    except OSError as exc:
        logging_setup.event(log, "server.failed", level=logging.ERROR, reason=str(exc))
        return 1
    http_task = loop.create_task(_serve_http(http), name="http")
    # NOTE: uvicorn offers no "started" event to await; `started` flips once its sockets listen.
    while not http.started and not http_task.done():  # noqa: ASYNC110
        await asyncio.sleep(0.01)
    if not http.started:
        reason = http_task.exception() if http_task.done() else None
        logging_setup.event(
            log, "server.failed", level=logging.ERROR, reason=str(reason or "HTTP did not start")
        )
        await grpc_server.stop(0)
        return 1
    http_port = http.servers[0].sockets[0].getsockname()[1]
    logging_setup.event(
        log, "server.listening", host=settings.host, http_port=http_port, grpc_port=grpc_port
    )

    started = time.perf_counter()
    start_task = loop.create_task(engine.start(), name="engine-start")
    stop_task = loop.create_task(stop.wait())
    await asyncio.wait({start_task, stop_task}, return_when=asyncio.FIRST_COMPLETED)
    if start_task.done() and start_task.exception() is None:
        # NOTE: everything allocated so far (modules, models, app) lives as long as the
        # process; out of the collector's sight, a full collection no longer walks it (it paused
        # the loop 60–90 ms under load, straight into p99; bench/RESULTS.md, Sessions).
        gc.collect()
        gc.freeze()
        await grpc_server.refresh_health()
        models = [
            {
                "name": m.name,
                "version": v.version,
                "state": v.state,
                "load_s": v.load_seconds,
            }
            | ({"reason": v.reason} if v.reason else {})
            for m in engine.list_models()
            for v in m.versions
        ]
        logging_setup.event(
            log,
            "server.ready" if engine.ready else "server.started_not_ready",
            host=settings.host,
            http_port=http_port,
            grpc_port=grpc_port,
            docs=f"{http_url(settings.host, http_port)}/docs",
            device=device,
            startup_s=round(time.perf_counter() - started, 3),
            models=models,
        )
        await stop_task
    elif start_task.done():
        logging_setup.event(
            log, "server.failed", level=logging.ERROR, reason=str(start_task.exception())
        )
        stop.set()

    logging_setup.event(
        log, "server.draining", signal=",".join(received) or None, grace_s=settings.drain_grace_s
    )
    drain_started = time.perf_counter()
    await grpc_server.begin_drain()
    if not start_task.done():
        start_task.cancel()
        await asyncio.gather(start_task, return_exceptions=True)
    # NOTE: the engine ends its work within the grace less a reserve; the servers get the rest.
    await engine.drain(settings.drain_grace_s)
    left = max(0.05, settings.drain_grace_s - (time.perf_counter() - drain_started) - 0.05)
    http.config.timeout_graceful_shutdown = left  # type: ignore[assignment]
    http.should_exit = True
    await asyncio.gather(http_task, grpc_server.stop(left), return_exceptions=True)
    logging_setup.event(
        log,
        "server.stopped",
        drain_s=round(time.perf_counter() - drain_started, 3),
        compute_finished=engine.threads_done,
    )
    failed = not start_task.cancelled() and start_task.exception() is not None
    return 1 if failed else 0
