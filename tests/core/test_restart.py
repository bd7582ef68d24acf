"""A component that dies is not READY: when a model version's decode scheduler or encode batcher
stops on its own, the version leaves READY (readiness, metadata, V2 ready and metrics say so,
with the reason), its requests get NotReady (503 / UNAVAILABLE) instead of hanging, the registry
restarts it with a fresh component, and a drain after such a failure ends cleanly.

The failure is real: an exception is raised inside the component's own scheduling task, through
the asyncio event it is waiting on (`kill`), and the real code handles it.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest

from service.core.engine import Engine
from service.core.errors import NotReady
from service.core.metrics import Metrics
from service.core.types import EncodeRequest, GenerateRequest, TokenEvent
from service.http_api.app import create_app
from service.inference_protocol import metadata
from tests.factories import write_model
from tests.support import StartEngine, device_held, offline, sample

pytestmark = pytest.mark.timeout(60)


async def kill(wakeup: asyncio.Event | None, error: BaseException) -> None:
    """Raise `error` in the task waiting on `wakeup` (a component's scheduling task)."""
    assert wakeup is not None
    for _ in range(500):
        waiters = [w for w in getattr(wakeup, "_waiters", ()) if not w.done()]
        if waiters:
            waiters[0].set_exception(error)
            await asyncio.sleep(0)
            return
        await asyncio.sleep(0.002)
    raise AssertionError("the task never waited on the event")


async def wait_state(engine: Engine, name: str, state: str) -> str | None:
    for _ in range(500):
        (version,) = engine.model_info(name).versions
        if version.state == state:
            return version.reason
        await asyncio.sleep(0.01)
    raise AssertionError(f"{name} never became {state}: {engine.model_info(name)}")


async def test_a_decoder_that_dies_leaves_ready_fails_its_requests_and_is_restarted(
    repository: Path, start_engine: StartEngine, metrics: Metrics
) -> None:
    path = write_model(
        repository, "s2s", task="seq2seq", input_type="text", attention=True, max_length=400
    )
    engine = await start_engine()
    app = create_app(engine, engine.settings, metrics)
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://rnnserve")
    labels = {"model": "s2s", "version": "1"}
    scheduler = engine.registry.resolve("s2s").decoder
    assert scheduler is not None
    streaming = asyncio.Event()

    async def long() -> None:
        async for event in engine.generate_stream(GenerateRequest("s2s", ["abc"], "text")):
            if isinstance(event, TokenEvent):
                streaming.set()

    running = asyncio.ensure_future(long())
    await streaming.wait()
    # Decoding runs, nothing waits: the prefill task waits on its event.
    await kill(scheduler._prefill_wakeup, RuntimeError("injected"))

    # The request in flight hears why, at once (it was 400 tokens from its end).
    with pytest.raises(NotReady, match="decoder stopped"):
        await asyncio.wait_for(running, 5)
    reason = await wait_state(engine, "s2s", "FAILED")
    assert reason is not None and "RuntimeError('injected')" in reason and "restarting" in reason
    assert not engine.ready
    assert not metadata.model_ready(engine, "s2s", None)
    assert sample(metrics, "rnnserve_model_state", **labels, state="FAILED") == 1
    assert sample(metrics, "rnnserve_model_state", **labels, state="READY") == 0
    assert (await http.get("/readyz")).status_code == 503
    described = (await http.get("/v1/models/s2s")).json()
    assert described["versions"][0]["state"] == "FAILED"
    assert "decoder stopped" in described["versions"][0]["reason"]
    refused = await http.post("/v1/models/s2s/generate", json={"texts": ["ab"]})
    assert refused.status_code == 503 and refused.headers["retry-after"] == "1"

    # Restarted: a fresh scheduler over the same weights, READY again, same answers.
    assert await wait_state(engine, "s2s", "READY") is None
    assert engine.ready and (await http.get("/readyz")).status_code == 200
    assert engine.registry.resolve("s2s").decoder is not scheduler
    result = await engine.generate(GenerateRequest("s2s", ["ab"], "text", max_length=6))
    assert result.outputs[0].tokens == offline(path, ["ab"], 1, 6)[0]
    assert sample(metrics, "rnnserve_model_state", **labels, state="READY") == 1
    assert sample(metrics, "rnnserve_model_restarts_total", **labels) == 1

    # A second failure waits longer (backoff).
    fresh = engine.registry.resolve("s2s").decoder
    assert fresh is not None
    await kill(fresh._wakeup, RuntimeError("again"))
    reason = await wait_state(engine, "s2s", "FAILED")
    assert reason is not None and "restarting in 0.2 s" in reason
    await wait_state(engine, "s2s", "READY")
    await http.aclose()


async def test_a_batcher_that_dies_fails_its_queue_and_is_restarted(
    repository: Path, start_engine: StartEngine, metrics: Metrics
) -> None:
    write_model(repository, "enc", input_type="features", input_size=4)
    engine = await start_engine()
    batcher = engine.registry.resolve("enc").batcher
    assert batcher is not None
    request = EncodeRequest("enc", [[[0.1] * 4] * 3], "features")  # type: ignore[list-item]
    async with device_held(engine):
        # One batch waits for the device; the next request queues behind it.
        first = asyncio.ensure_future(engine.encode(request))
        await asyncio.sleep(0.05)
        queued = asyncio.ensure_future(engine.encode(request))
        await asyncio.sleep(0.05)
        await kill(batcher._wakeup, RuntimeError("injected"))
        with pytest.raises(NotReady, match="batcher stopped"):
            await asyncio.wait_for(queued, 5)
    # The batch that was already on the device is answered; nothing hangs.
    assert len((await asyncio.wait_for(first, 5)).encodings) == 1
    await wait_state(engine, "enc", "READY")
    assert engine.registry.resolve("enc").batcher is not batcher
    assert len((await engine.encode(request)).encodings) == 1
    assert sample(metrics, "rnnserve_model_restarts_total", model="enc", version="1") == 1


async def test_drain_after_a_component_died_ends_cleanly(
    repository: Path, start_engine: StartEngine, caplog: pytest.LogCaptureFixture
) -> None:
    write_model(repository, "s2s", task="seq2seq", input_type="text")
    write_model(repository, "enc", input_type="features", input_size=4)
    engine = await start_engine()
    decoder = engine.registry.resolve("s2s").decoder
    batcher = engine.registry.resolve("enc").batcher
    assert decoder is not None and batcher is not None
    await kill(decoder._wakeup, RuntimeError("injected"))
    await kill(batcher._wakeup, RuntimeError("injected"))
    # Drained before the restarts are due: no error, everything unloaded.
    await asyncio.wait_for(engine.drain(2.0), 5)
    assert engine.list_models() == []
    assert "Traceback" not in caplog.text
