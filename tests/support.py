"""What the tests share: real servers (in a thread or as a process), a served engine, metric
readers, and the cases and reference computations several layers' tests use.

Tests import from here (and from tests/factories.py, which writes checkpoints), never from
each other; pytest fixtures that wrap these live in tests/conftest.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
import torch
import uvicorn
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from models import checkpoint
from models.config import ModelConfig
from models.encoder import collate
from rnnserve_client.proto.inference import grpc_service_pb2 as v2
from service.core.engine import Engine
from service.core.metrics import Metrics
from service.core.sessions import SessionManager
from service.core.settings import Settings
from service.core.state_tokens import StateTokenCodec
from service.grpc_api.convert import decode_v2_inputs
from service.http_api.app import create_app
from service.http_api.connection import deadline_protocol
from service.inference_protocol.tensors import V2Tensor
from tests.factories import CHAR_VOCAB, write_model

ROOT = Path(__file__).resolve().parent.parent
DEMO_REPOSITORY = ROOT / "demo-repository"
TOKEN = "s3cret-management-token"
T = TypeVar("T")


# --- an engine in the test's own loop ---

StartEngine = Callable[..., Awaitable[Engine]]


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    """The value of one sample of the injected registry (0 when it was never set)."""
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


@contextlib.asynccontextmanager
async def device_held(engine: Engine) -> AsyncIterator[None]:
    """Keep the engine's device thread busy (a real job on the executor) until the block ends."""
    release = threading.Event()
    job = asyncio.ensure_future(engine.executor.run(release.wait, 30.0))
    await asyncio.sleep(0)  # the job is submitted once its task first runs
    assert not engine.executor.idle
    try:
        yield
    finally:
        release.set()
        await job


# --- an engine on a loop of its own (for synchronous tests and hypothesis) ---

KEY = b"test-state-key-0123456789abcdef"


class Served:
    """An engine and a session manager living on a loop in a background thread."""

    def __init__(self, repository: Path, **settings: Any) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.registry = CollectorRegistry()
        self.metrics = Metrics(self.registry)
        options: dict[str, Any] = {
            "repository": repository,
            "device": "cpu",
            "cpu_threads": 1,
            "state_key": KEY.decode(),
        }
        self.engine = Engine(Settings(**{**options, **settings}), self.metrics)
        self.run(self.engine.start())
        # The engine's own manager (configured from Settings, started by engine.start()).
        self.sessions = self.engine.sessions

    def manager(self, **options: Any) -> SessionManager:
        """Another started SessionManager over the engine, with its own metrics."""
        manager = SessionManager(
            self.engine,
            StateTokenCodec(options.pop("key", KEY)),
            metrics=Metrics(CollectorRegistry()),
            **options,
        )
        self.run(manager.start())
        return manager

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.run(self.engine.drain(1.0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


# --- an HTTP server in a thread: engine + uvicorn on a free loopback port ---


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


@contextlib.contextmanager
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
                # NOTE: the protocol `rnnserve serve` runs (service/process/serve.py).
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


# --- `rnnserve serve` as a real process ---

GRACE_S = 8.0


@dataclass
class ServerProcess:
    process: subprocess.Popen[str]
    lines: list[dict[str, Any]] = field(default_factory=list)
    http_port: int = 0
    grpc_port: int = 0

    def events(self, name: str) -> list[dict[str, Any]]:
        return [line for line in self.lines if line.get("event") == name]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def metric(self, name: str, **labels: str) -> float:
        """One sample of the server's /metrics (0 when absent)."""
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        for line in text.splitlines():
            if line.startswith(name + "{") or line.startswith(name + " "):
                sample, value = line.rsplit(" ", 1)
                got = sample[len(name) :].strip("{}")
                if ",".join(sorted(got.split(","))) == want:
                    return float(value)
        return 0.0


@contextlib.contextmanager
def running_server(repository: Path, *flags: str) -> Iterator[ServerProcess]:
    """`rnnserve serve` on `repository` (CPU; `flags` added last, so they win) until the block
    ends (then SIGKILL if still running)."""
    env = {**os.environ, "RNNSERVE_LOG_FORMAT": "json", "RNNSERVE_DRAIN_GRACE_S": "1"}
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "service.process.cli",
            "serve",
            "--repository",
            str(repository),
            "--http-port",
            "0",
            "--grpc-port",
            "0",
            "--cpu-threads",
            "1",
            "--device",
            "cpu",
            # NOTE: the flag must win over RNNSERVE_DRAIN_GRACE_S=1 above.
            "--drain-grace-s",
            str(GRACE_S),
            *flags,
        ],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    served = ServerProcess(process)
    ready = threading.Event()

    def read() -> None:
        assert process.stderr is not None
        for raw in process.stderr:
            try:
                line = json.loads(raw)
            except json.JSONDecodeError:
                line = {"raw": raw}
            served.lines.append(line)
            if line.get("event") == "server.ready":
                served.http_port, served.grpc_port = line["http_port"], line["grpc_port"]
                ready.set()

    threading.Thread(target=read, daemon=True).start()
    try:
        assert ready.wait(60), f"server did not become ready: {served.lines}"
        yield served
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
        process.wait(10)


# --- reading answers and metrics ---


def metric_value(text: str, name: str, **labels: str) -> float:
    """Sum of the samples called `name` whose labels include `labels`, in Prometheus text."""
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and labels.items() <= sample.labels.items():
                total += sample.value
    return total


def requests_total(url: str, **labels: str) -> float:
    """rnnserve_requests_total of the server at `url`, summed over the series with `labels`."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    total = 0.0
    for family in text_string_to_metric_families(text):
        if family.name != "rnnserve_requests":
            continue
        for sample in family.samples:
            if sample.name.endswith("_total") and labels.items() <= sample.labels.items():
                total += sample.value
    return total


def decode_v2_outputs(response: v2.ModelInferResponse) -> dict[str, V2Tensor]:
    """A V2 gRPC response's outputs (raw or typed contents) by name, decoded as the server
    decodes input tensors."""
    request = v2.ModelInferRequest(raw_input_contents=response.raw_output_contents)
    for output in response.outputs:
        request.inputs.add(
            name=output.name, datatype=output.datatype, shape=output.shape, contents=output.contents
        )
    return {tensor.name: tensor for tensor in decode_v2_inputs(request)}


# --- reference computations and cases ---


def offline(path: Path, texts: list[str], beam_size: int, max_length: int) -> list[list[int]]:
    """Seq2SeqModel.generate straight from the checkpoint: one batch, no server."""
    loaded = checkpoint.load(path)
    ids = [torch.tensor([CHAR_VOCAB.index(c) for c in t]) for t in texts]
    lengths = torch.tensor([len(i) for i in ids])
    with torch.inference_mode():
        return loaded.model.generate(  # type: ignore[union-attr]
            torch.nn.utils.rnn.pad_sequence(ids, batch_first=True),
            lengths,
            max_length=max_length,
            beam_size=beam_size,
        )


LOGPROB_ATOL = 5e-2

PRECISION_ENCODERS: dict[str, dict[str, Any]] = {
    "rnn-tanh": {"cell": "rnn", "pooling": "last"},
    "rnn-relu-deep": {"cell": "rnn", "nonlinearity": "relu", "num_layers": 2, "pooling": "max"},
    "lstm-deep": {"cell": "lstm", "num_layers": 2, "hidden_size": 64, "pooling": "mean"},
    "lstm-bi": {"cell": "lstm", "bidirectional": True, "num_layers": 2, "head": ["a", "b"]},
    "gru": {"cell": "gru", "hidden_size": 64, "head": 3},
    "gru-reset-before-bi": {"cell": "gru", "reset_after": False, "bidirectional": True},
    "tokens-gru-deep": {"cell": "gru", "input_type": "tokens", "num_layers": 3},
    "text-lstm": {"cell": "lstm", "input_type": "text", "pooling": "mean", "head": 4},
}

PRECISION_SEQ2SEQ: dict[str, dict[str, Any]] = {
    "lstm-attention": {"cell": "lstm", "attention": True, "num_layers": 2},
    "gru-bi-attention": {"cell": "gru", "attention": True, "bidirectional": True},
    "gru-reset-before": {"cell": "gru", "reset_after": False},
    "rnn-deep-bi": {"cell": "rnn", "num_layers": 2, "bidirectional": True},
}


def random_batch(config: ModelConfig, rows: int, longest: int, seed: int) -> tuple[Any, Any]:
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, longest + 1, (rows,), generator=generator)
    size = getattr(config.input, "size", None)
    vocab = getattr(config.input, "vocab_size", 0)
    sequences = [
        torch.randn(int(n), size, generator=generator)
        if size is not None
        else torch.randint(2, vocab, (int(n),), generator=generator)
        for n in lengths
    ]
    return collate(sequences)
