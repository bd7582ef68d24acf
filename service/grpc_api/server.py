"""The gRPC server: both services (service/grpc_api/v1_servicer.py, v2_servicer.py) on one
grpc.aio server, with `grpc.health.v1` following the engine, server reflection, message size
limits, and connection ageing.
"""

from __future__ import annotations

import asyncio
import logging
import math

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from rnnserve_client.proto.inference import grpc_service_pb2 as v2_pb
from rnnserve_client.proto.rnnserve.v1 import rnnserve_pb2 as pb
from service.core.engine import Engine
from service.core.metrics import Metrics
from service.core.settings import Settings
from service.grpc_api.calls import add_service
from service.grpc_api.message_limits import MessageLimits
from service.grpc_api.v1_servicer import RnnServeServicer
from service.grpc_api.v2_servicer import InferenceServicer

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["RnnServe"].full_name
V2_SERVICE_NAME = v2_pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
HEALTH_POLL_S = 0.1


class HealthReporter:
    """Keeps `grpc.health.v1` in step with the engine: "" and each service follow readiness,
    each model name follows "has a READY version"; NOT_SERVING for good once draining."""

    def __init__(self, engine: Engine, servicer: HealthServicer) -> None:
        self.engine = engine
        self.servicer = servicer
        self._known: dict[str, int] = {}
        self._task: asyncio.Task[None] | None = None

    async def update(self) -> None:
        """Publish the current statuses (only the changed ones)."""
        ready = self.engine.ready and not self.engine.draining
        overall = SERVING if ready else NOT_SERVING
        statuses = {"": overall, SERVICE_NAME: overall, V2_SERVICE_NAME: overall}
        for info in self.engine.list_models():
            serving = ready and any(v.state == "READY" for v in info.versions)
            statuses[info.name] = SERVING if serving else NOT_SERVING
        for name in self._known.keys() - statuses.keys():
            statuses[name] = NOT_SERVING
        for name, status in statuses.items():
            if self._known.get(name) != status:
                await self.servicer.set(name, status)
                self._known[name] = status

    async def _run(self) -> None:
        while True:
            try:
                await self.update()
            except Exception:
                log.exception("health update failed")
            await asyncio.sleep(HEALTH_POLL_S)

    def start(self) -> None:
        """Start following the engine (inside the running loop)."""
        self._task = asyncio.get_running_loop().create_task(self._run(), name="grpc-health")

    async def shut_down(self) -> None:
        """NOT_SERVING everywhere, permanently (drain started)."""
        await self.servicer.enter_graceful_shutdown()

    async def stop(self) -> None:
        """Stop following the engine."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None


# gRPC core reads durations as int milliseconds, INT_MAX meaning "never".
_GRPC_NEVER_MS = 2**31 - 1


def grpc_milliseconds(seconds: float) -> int:
    """`seconds` as a gRPC core duration option (inf → INT_MAX, "never")."""
    if math.isinf(seconds):
        return _GRPC_NEVER_MS
    return min(_GRPC_NEVER_MS, max(1, round(seconds * 1000)))


def connection_age_options(settings: Settings) -> list[tuple[str, int]]:
    """Server options that end each connection gracefully after its age (gRFC A9): the core
    sends GOAWAY at the age (±10% jitter), so the client opens a new connection, through the
    Service, for its next calls; calls running then finish on the old one within the grace."""
    return [
        ("grpc.max_connection_age_ms", grpc_milliseconds(settings.grpc_max_connection_age_s)),
        (
            "grpc.max_connection_age_grace_ms",
            grpc_milliseconds(settings.grpc_max_connection_age_grace_s),
        ),
    ]


class GrpcServer:
    """Both gRPC services, health and reflection on one grpc.aio server bound to host:port."""

    def __init__(self, engine: Engine, settings: Settings, metrics: Metrics) -> None:
        self.engine = engine
        self.settings = settings
        self.metrics = metrics
        self.port: int | None = None
        self.server: grpc.aio.Server | None = None
        self.health: HealthReporter | None = None
        self._stopping: asyncio.Task[None] | None = None

    async def start(self) -> int:
        """Build, bind and start the server (inside the running loop); returns the bound port."""
        limit = self.settings.grpc_max_message_bytes
        server = grpc.aio.server(
            options=[
                ("grpc.max_send_message_length", limit),
                ("grpc.max_receive_message_length", limit),
                ("grpc.so_reuseport", 0),
                *connection_age_options(self.settings),
            ]
        )
        limits = MessageLimits.from_settings(self.settings)
        services = (
            (pb.DESCRIPTOR.services_by_name["RnnServe"], RnnServeServicer),
            (v2_pb.DESCRIPTOR.services_by_name["GRPCInferenceService"], InferenceServicer),
        )
        for service, servicer in services:
            add_service(server, service, servicer(self.engine, self.settings, self.metrics), limits)
        health_servicer = HealthServicer()
        # NOTE: the library starts "" as SERVING; nothing is ready before the models load.
        await health_servicer.set("", NOT_SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        reflection.enable_server_reflection(
            (
                SERVICE_NAME,
                V2_SERVICE_NAME,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ),
            server,
        )
        address = f"{self.settings.host}:{self.settings.grpc_port}"
        try:
            port = server.add_insecure_port(address)
        except RuntimeError as exc:
            raise OSError(f"gRPC cannot bind {address} (in use, or not an address here)") from exc
        await server.start()
        self.server, self.port = server, port
        self.health = HealthReporter(self.engine, health_servicer)
        self.health.start()
        return port

    async def refresh_health(self) -> None:
        """Publish the engine's current state to the health service now (not at the next poll)."""
        if self.health is not None:
            await self.health.update()

    async def begin_drain(self) -> None:
        """Readiness off at once (every health service NOT_SERVING), and every connection told
        to go away (GOAWAY): clients open new ones, through the Service, to other replicas;
        calls already running here go on (`stop` bounds them)."""
        if self.health is not None:
            await self.health.stop()
            await self.health.shut_down()
        if self.server is not None and self._stopping is None:
            # NOTE: grpc.aio's stop sends GOAWAY and stops listening at once; the grace given
            # here is only an upper bound, `stop` below cuts running calls sooner.
            self._stopping = asyncio.get_running_loop().create_task(
                self.server.stop(self.settings.drain_grace_s + 5.0), name="grpc-goaway"
            )
            # NOTE: one turn of the loop runs the stop up to its GOAWAY (grpc.aio starts the
            # core's shutdown before its first await), so that connections are told to go
            # away before the engine starts refusing what still arrives on them.
            await asyncio.sleep(0)

    async def stop(self, grace_s: float | None) -> None:
        """Stop accepting calls; let running ones finish for up to `grace_s` seconds."""
        if self.health is not None:
            await self.health.stop()
        if self.server is not None:
            # NOTE: a second stop call waits `grace_s`, then cancels what still runs.
            await self.server.stop(grace_s)
        if self._stopping is not None:
            await self._stopping


def create_grpc_server(engine: Engine, settings: Settings, metrics: Metrics) -> GrpcServer:
    """The gRPC front-end of `engine` (call `await server.start()` inside the loop)."""
    return GrpcServer(engine, settings, metrics)
