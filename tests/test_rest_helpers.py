"""A real rnnserve HTTP server for the REST tests: engine + uvicorn on a free loopback port.

The server runs in a background thread with its own event loop (the engine is started inside
it, as service/main.py does), so tests talk to it over real sockets with real clients.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvicorn
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from service.engine import Engine
from service.http_protocol import deadline_protocol
from service.metrics import Metrics
from service.rest import create_app
from service.settings import Settings
from tests.factories import write_model

TOKEN = "s3cret-management-token"


def metric_value(text: str, name: str, **labels: str) -> float:
    """Sum of the samples called `name` whose labels include `labels`, in Prometheus text."""
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and labels.items() <= sample.labels.items():
                total += sample.value
    return total


@dataclass
class LiveServer:
    url: str
    port: int
    engine: Engine
    settings: Settings
    repository: Path
    loop: asyncio.AbstractEventLoop

    def call(self, coroutine: Coroutine[Any, Any, Any]) -> Any:
        """Run a coroutine on the server's own event loop (e.g. engine.drain) and wait."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(60)


def write_test_repository(repository: Path) -> None:
    """The tiny real checkpoints the REST tests serve."""
    write_model(repository, "feat", 1, seed=1, input_size=8, head=["neg", "pos"])
    write_model(repository, "feat", 2, seed=2, input_size=8, head=["neg", "pos"])
    write_model(repository, "tok", 1, input_type="tokens", cell="gru", num_layers=2)
    write_model(repository, "words", 1, input_type="text", bidirectional=True)
    write_model(repository, "translit", 1, task="seq2seq", input_type="text", max_length=8)
    write_model(repository, "short", 1, input_size=4, serving={"max_sequence_length": 16})
    # Batches wait long for company, and the queue holds 2: overload and deadlines are reachable.
    write_model(
        repository,
        "slow",
        1,
        input_size=4,
        serving={"max_batch_size": 64, "max_delay_ms": 400.0, "max_queue_size": 2},
    )
    # Long enough to keep the (one-thread) device busy for a while.
    write_model(
        repository,
        "heavy",
        1,
        input_type="tokens",
        hidden_size=128,
        num_layers=2,
        serving={"max_sequence_length": 8192},
    )
    broken = write_model(repository, "broken", 1, input_size=4)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")


@contextmanager
def live_server(repository: Path, **overrides: Any) -> Iterator[LiveServer]:
    """Serve `repository` on 127.0.0.1:<free port> until the block ends."""
    options: dict[str, Any] = {
        "repository": repository,
        "device": "cpu",
        "version_policy": "all",
        "strict_readiness": False,
        "cpu_threads": 1,
        "max_text_length": 40,
        "max_sequences_per_request": 8,
        "max_body_bytes": 256 * 1024,
        **overrides,
    }
    settings = Settings(**options)
    started = threading.Event()
    holder: dict[str, Any] = {}

    async def main() -> None:
        metrics = Metrics(CollectorRegistry())
        engine = Engine(settings, metrics)
        await engine.start()
        app = create_app(engine, settings, metrics)
        server = uvicorn.Server(
            uvicorn.Config(
                app,
                host="127.0.0.1",
                port=0,
                lifespan="off",
                log_level="warning",
                access_log=False,
                # NOTE: the protocol `rnnserve serve` runs (service/main.py).
                http=deadline_protocol(
                    settings.http_header_timeout_s, settings.http_body_timeout_s
                ),
            )
        )
        holder.update(engine=engine, server=server, loop=asyncio.get_running_loop())
        task = asyncio.create_task(server.serve())
        while not server.started and not task.done():  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        holder["port"] = server.servers[0].sockets[0].getsockname()[1] if server.started else 0
        started.set()
        await task
        await engine.drain(0.5)

    def run() -> None:
        try:
            asyncio.run(main())
        except BaseException as exc:  # surfaced to the test thread below
            holder["error"] = exc
            started.set()

    thread = threading.Thread(target=run, name="rest-test-server", daemon=True)
    thread.start()
    started.wait(60)
    if "error" in holder or not holder.get("port"):
        raise RuntimeError(f"test server did not start: {holder.get('error')!r}")
    port = holder["port"]
    try:
        yield LiveServer(
            f"http://127.0.0.1:{port}", port, holder["engine"], settings, repository, holder["loop"]
        )
    finally:
        holder["server"].should_exit = True
        thread.join(30)
