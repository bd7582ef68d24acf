"""Shared fixtures: a fresh model repository, an injected metrics registry, a real engine, the
demo server. Helpers the tests share live in tests/support.py; test modules add their own fixtures.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from prometheus_client import CollectorRegistry

from service.core.engine import Engine
from service.core.metrics import Metrics
from service.core.settings import Settings
from tests.support import DEMO_REPOSITORY, ServerProcess, StartEngine, running_server

# NOTE: one intra-op thread for everything the suite computes in this process: on 2 shared
# cores more threads make tests slower and their timings unstable (bench/RESULTS.md, Engine).
torch.set_num_threads(1)


@pytest.fixture
def repository(tmp_path: Path) -> Path:
    """An empty model repository folder (tests write real checkpoints into it)."""
    path = tmp_path / "repository"
    path.mkdir()
    return path


@pytest.fixture
def metrics() -> Metrics:
    """Metrics on their own CollectorRegistry (never the global one)."""
    return Metrics(CollectorRegistry())


@pytest.fixture
async def start_engine(repository: Path, metrics: Metrics) -> AsyncIterator[StartEngine]:
    """`await start_engine(**settings)`: a started Engine on `repository` (CPU, 1 thread),
    drained at the end of the test."""
    engines: list[Engine] = []

    async def start(**overrides: Any) -> Engine:
        options: dict[str, Any] = {
            "repository": repository,
            "device": "cpu",
            "cpu_threads": 1,
            "drain_grace_s": 2.0,
        }
        options.update(overrides)
        engine = Engine(Settings(**options), metrics)
        await engine.start()
        engines.append(engine)
        return engine

    yield start
    for engine in engines:
        if not engine.draining:
            await engine.drain(2.0)


@pytest.fixture(scope="session")
def demo_server() -> Iterator[ServerProcess]:
    """`rnnserve serve` on the bundled demo repository (CPU, free ports), shared by the tests
    that replay the README and run independent clients."""
    with running_server(DEMO_REPOSITORY) as served:
        yield served
