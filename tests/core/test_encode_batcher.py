"""The encode batcher through the engine's public API, with real tiny checkpoints."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from models import checkpoint
from models.encoder import EncoderModel
from service.core import encode_batcher as batching
from service.core.encode_batcher import EncodeCompute, Item
from service.core.engine import Engine
from service.core.errors import ComputeError, DeadlineExceeded, Overloaded
from service.core.metrics import Metrics
from service.core.types import ChunkRequest, EncodeRequest
from tests.factories import write_model
from tests.support import StartEngine, device_held, sample

FEATURES = 8
HIDDEN = 16  # tests.factories' default hidden size


def features(lengths: list[int], seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((n, FEATURES)).astype(np.float32) for n in lengths]


def request(model: str, seqs: list[np.ndarray], **kwargs: object) -> EncodeRequest:
    return EncodeRequest(model=model, sequences=list(seqs), kind="features", **kwargs)  # type: ignore[arg-type]


def calls(metrics: Metrics, model: str, version: int = 1) -> float:
    return sample(
        metrics, "rnnserve_model_calls_total", model=model, version=str(version), kind="encode"
    )


def batches(metrics: Metrics, model: str) -> tuple[float, float]:
    """(number of batches, total sequences) recorded by rnnserve_batch_size."""
    labels = {"model": model, "version": "1", "kind": "encode"}
    return (
        sample(metrics, "rnnserve_batch_size_count", **labels),
        sample(metrics, "rnnserve_batch_size_sum", **labels),
    )


def reference(repository: Path, name: str, seqs: list[np.ndarray]) -> np.ndarray:
    """Each sequence encoded alone, straight from the checkpoint (no engine)."""
    loaded = checkpoint.load(repository / name / "1")
    out = []
    with torch.inference_mode():
        for seq in seqs:
            x = torch.from_numpy(seq)[None]
            out.append(loaded.model(x, torch.tensor([len(seq)])).encodings[0].numpy())
    return np.stack(out)


async def test_batch_invariance_alone_together_interleaved(
    repository: Path, start_engine: StartEngine
) -> None:
    write_model(repository, "m", cell="gru", num_layers=2, bidirectional=True, input_size=FEATURES)
    engine = await start_engine()
    lengths = [1, 9, 4, 17, 2, 33, 8, 8, 5, 12]
    seqs = features(lengths, seed=1)
    expected = reference(repository, "m", seqs)

    alone = np.stack([(await engine.encode(request("m", [s]))).encodings[0] for s in seqs])
    together = (await engine.encode(request("m", seqs))).encodings
    # Concurrent callers, each sending a few sequences in a different order.
    order = np.random.default_rng(2).permutation(len(seqs))

    async def caller(indices: list[int]) -> list[tuple[int, np.ndarray]]:
        result = await engine.encode(request("m", [seqs[i] for i in indices]))
        return list(zip(indices, result.encodings, strict=True))

    groups = [[int(i) for i in order[k : k + 3]] for k in range(0, len(seqs), 3)]
    interleaved_pairs = [p for ps in await asyncio.gather(*map(caller, groups)) for p in ps]
    interleaved = np.stack([e for _, e in sorted(interleaved_pairs, key=lambda p: p[0])])

    # NOTE: BLAS may round the last bit differently for another batch size, hence 1e-6.
    for got in (alone, together, interleaved):
        assert isinstance(got, np.ndarray)
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


async def test_many_sequences_split_into_batches_and_reassembled_in_order(
    repository: Path, start_engine: StartEngine, metrics: Metrics
) -> None:
    write_model(repository, "m", input_size=FEATURES, serving={"max_batch_size": 4})
    engine = await start_engine()
    seqs = features([3, 1, 7, 2, 9, 4, 6, 5, 8, 2, 3], seed=3)
    before = batches(metrics, "m")
    result = await engine.encode(request("m", seqs))
    count, total = (a - b for a, b in zip(batches(metrics, "m"), before, strict=True))
    assert total == len(seqs) and count >= 3  # ≤ 4 per batch
    np.testing.assert_allclose(result.encodings, reference(repository, "m", seqs), atol=1e-6)


async def test_cost_budget_closes_a_batch(
    repository: Path, start_engine: StartEngine, metrics: Metrics
) -> None:
    write_model(repository, "m", input_size=FEATURES)
    engine = await start_engine(max_batch_timesteps=20)
    seqs = features([10, 10, 10, 10], seed=4)
    before = batches(metrics, "m")
    async with device_held(engine):
        task = asyncio.ensure_future(engine.encode(request("m", seqs)))
        await asyncio.sleep(0.01)
    await task
    count, total = (a - b for a, b in zip(batches(metrics, "m"), before, strict=True))
    assert (count, total) == (2, 4)


async def test_lone_request_does_not_wait_for_max_delay(
    repository: Path, start_engine: StartEngine
) -> None:
    write_model(repository, "m", input_size=FEATURES, serving={"max_delay_ms": 5000.0})
    engine = await start_engine()
    start = time.monotonic()
    await engine.encode(request("m", features([5], seed=5)))
    assert time.monotonic() - start < 1.0  # no idle waiting: the device was free


async def test_max_delay_closes_the_batch_while_the_device_is_busy(
    repository: Path, start_engine: StartEngine, metrics: Metrics
) -> None:
    write_model(repository, "m", input_size=FEATURES, serving={"max_delay_ms": 100.0})
    engine = await start_engine()
    before = batches(metrics, "m")
    async with device_held(engine):
        first = asyncio.ensure_future(engine.encode(request("m", features([3], seed=6))))
        await asyncio.sleep(0.02)
        joins = asyncio.ensure_future(engine.encode(request("m", features([4], seed=7))))
        await asyncio.sleep(0.3)  # past max_delay: that batch is closed and waits for the device
        later = asyncio.ensure_future(engine.encode(request("m", features([5], seed=8))))
        await asyncio.sleep(0.02)
    await asyncio.gather(first, joins, later)
    count, total = (a - b for a, b in zip(batches(metrics, "m"), before, strict=True))
    assert (count, total) == (2, 3)


async def test_full_queue_rejects_at_once_with_a_retry_hint(
    repository: Path, start_engine: StartEngine
) -> None:
    write_model(
        repository,
        "m",
        input_size=FEATURES,
        serving={"max_queue_size": 3, "max_delay_ms": 10_000.0},
    )
    engine = await start_engine()
    async with device_held(engine):
        queued = asyncio.ensure_future(engine.encode(request("m", features([2, 2], seed=9))))
        await asyncio.sleep(0.01)
        start = time.monotonic()
        with pytest.raises(Overloaded) as caught:
            await engine.encode(request("m", features([2, 2], seed=10)))
        assert time.monotonic() - start < 0.1
        assert caught.value.retry_after_s > 0
        assert "queue full" in str(caught.value)
        one_more = asyncio.ensure_future(engine.encode(request("m", features([2], seed=11))))
        await asyncio.sleep(0.01)
    assert len((await queued).encodings) == 2
    assert len((await one_more).encodings) == 1


async def test_expired_and_cancelled_items_are_never_computed(
    repository: Path, start_engine: StartEngine, metrics: Metrics
) -> None:
    write_model(repository, "m", input_size=FEATURES, serving={"max_delay_ms": 10_000.0})
    engine = await start_engine()
    computed = calls(metrics, "m")
    async with device_held(engine):
        with pytest.raises(DeadlineExceeded):
            await engine.encode(request("m", features([3, 4], seed=12), timeout_s=0.05))
        cancelled = asyncio.ensure_future(engine.encode(request("m", features([5], seed=13))))
        await asyncio.sleep(0.01)
        cancelled.cancel()
        with pytest.raises(asyncio.CancelledError):
            await cancelled
    await asyncio.sleep(0.05)
    assert calls(metrics, "m") == computed
    labels = {"model": "m", "version": "1"}
    assert sample(metrics, "rnnserve_dropped_sequences_total", **labels, reason="deadline") == 2
    assert sample(metrics, "rnnserve_dropped_sequences_total", **labels, reason="cancelled") == 1
    assert engine.registry.resolve("m").batcher.queue_depth == 0  # type: ignore[union-attr]
    # The batcher still serves afterwards.
    assert len((await engine.encode(request("m", features([2], seed=14)))).encodings) == 1
    assert calls(metrics, "m") == computed + 1


async def test_an_exception_reaches_its_batch_and_nothing_else(
    repository: Path, start_engine: StartEngine
) -> None:
    write_model(repository, "a", input_size=FEATURES, serving={"max_delay_ms": 10_000.0})
    write_model(repository, "b", input_size=FEATURES, seed=1)
    engine = await start_engine()
    batcher = engine.registry.resolve("a").batcher
    assert batcher is not None
    loop = asyncio.get_running_loop()
    # A row of the wrong width reaches the batch only by skipping the engine's validation; it
    # fails while the batch is prepared on the loop (padding), before any model call.
    broken = Item(np.zeros((3, FEATURES + 1), np.float32), loop.create_future())
    sound = Item(features([3], seed=15)[0], loop.create_future())
    async with device_held(engine):
        batcher.submit([broken, sound])
        other_model = asyncio.ensure_future(engine.encode(request("b", features([4], seed=16))))
        await asyncio.sleep(0.01)
    for item in (broken, sound):
        with pytest.raises(ComputeError, match="model a version 1 failed"):
            await item.future
    assert len((await other_model).encodings) == 1
    assert len((await engine.encode(request("a", features([3], seed=15)))).encodings) == 1


async def test_a_failure_cutting_a_batch_into_rows_fails_that_batch_only(
    repository: Path, start_engine: StartEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_model(repository, "m", input_size=FEATURES)
    engine = await start_engine()
    batcher = engine.registry.resolve("m").batcher
    assert batcher is not None
    compute = batcher._compute
    rows = compute.rows

    def fail_once(*args: object) -> object:
        monkeypatch.setattr(compute, "rows", rows)
        raise RuntimeError("cut")

    # The loop-side stage after the model call: its callers get an error, not a hang.
    monkeypatch.setattr(compute, "rows", fail_once)
    with pytest.raises(ComputeError, match="model m version 1 failed on a batch of 2"):
        await engine.encode(request("m", features([3, 5], seed=18)))
    # The batcher serves on, with right answers.
    seqs = features([3, 5], seed=19)
    np.testing.assert_allclose(
        (await engine.encode(request("m", seqs))).encodings,
        reference(repository, "m", seqs),
        rtol=1e-5,
        atol=1e-6,
    )


async def test_drain_finishes_admitted_work_then_refuses(
    repository: Path, start_engine: StartEngine
) -> None:
    write_model(repository, "m", input_size=FEATURES, serving={"max_delay_ms": 10_000.0})
    engine: Engine = await start_engine()
    async with device_held(engine):
        admitted = asyncio.ensure_future(engine.encode(request("m", features([3, 3], seed=17))))
        await asyncio.sleep(0.01)
        drained = asyncio.ensure_future(engine.drain(5.0))
        await asyncio.sleep(0.01)
        assert not engine.ready
    await drained
    assert len((await admitted).encodings) == 2


async def test_rows_with_their_own_initial_state_share_a_batch(
    repository: Path, start_engine: StartEngine, metrics: Metrics
) -> None:
    path = write_model(repository, "m", input_size=FEATURES, num_layers=2, cell="gru")
    engine = await start_engine()
    whole, plain = features([9, 6], seed=18)
    first = await engine.encode_chunk(ChunkRequest("m", 1, whole[:5], "features", None, None))
    before = batches(metrics, "m")
    async with device_held(engine):
        chunk = asyncio.ensure_future(
            engine.encode_chunk(
                ChunkRequest("m", 1, whole[5:], "features", first.final_state, None)
            )
        )
        other = asyncio.ensure_future(engine.encode(request("m", [plain])))
        await asyncio.sleep(0.01)
    chunk_out, other_out = await chunk, await other
    count, total = (a - b for a, b in zip(batches(metrics, "m"), before, strict=True))
    assert (count, total) == (1, 2)  # one model call for both rows (poolings "none" and "last")
    loaded = checkpoint.load(path)
    with torch.inference_mode():
        steps = loaded.model(torch.from_numpy(whole)[None], torch.tensor([9]), "none")
    np.testing.assert_allclose(
        chunk_out.outputs, steps.encodings[0, 5:].numpy(), rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(
        other_out.encodings, reference(repository, "m", [plain]), rtol=1e-5, atol=1e-6
    )


async def test_mixed_poolings_share_one_model_call(
    repository: Path, start_engine: StartEngine, metrics: Metrics
) -> None:
    path = write_model(
        repository, "m", input_size=FEATURES, bidirectional=True, head=["a", "b", "c"], seed=3
    )
    engine = await start_engine()
    seqs = features([7, 3], seed=19)
    poolings = ("last", "mean", "max", "none")
    before = calls(metrics, "m")
    async with device_held(engine):
        tasks = [
            asyncio.ensure_future(engine.encode(request("m", seqs, pooling=p))) for p in poolings
        ]
        await asyncio.sleep(0.01)
    results = await asyncio.gather(*tasks)
    assert calls(metrics, "m") == before + 1
    loaded = checkpoint.load(path)
    lengths = torch.tensor([7, 3])
    padded = torch.nn.utils.rnn.pad_sequence([torch.from_numpy(s) for s in seqs], True)
    for pooling, result in zip(poolings, results, strict=True):
        with torch.inference_mode():
            expected = loaded.model(padded, lengths, pooling)  # type: ignore[arg-type]
        assert expected.scores is not None and result.scores is not None
        np.testing.assert_allclose(result.scores, expected.scores.numpy(), rtol=1e-5, atol=1e-6)
        if pooling == "none":
            for i, n in enumerate((7, 3)):
                np.testing.assert_allclose(
                    result.encodings[i], expected.encodings[i, :n].numpy(), rtol=1e-5, atol=1e-6
                )
        else:
            np.testing.assert_allclose(
                result.encodings, expected.encodings.numpy(), rtol=1e-5, atol=1e-6
            )


@pytest.fixture
async def property_engine(repository: Path, start_engine: StartEngine) -> Engine:
    """One engine for every example of a property test (examples share the model)."""
    write_model(repository, "p", input_size=FEATURES, cell="lstm", num_layers=2, seed=5)
    return await start_engine()


@settings(
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    lengths=st.lists(st.integers(1, 40), min_size=1, max_size=12),
    split=st.integers(1, 4),
    seed=st.integers(0, 2**16),
)
async def test_property_batching_never_changes_a_result(
    repository: Path, property_engine: Engine, lengths: list[int], split: int, seed: int
) -> None:
    engine = property_engine
    seqs = features(lengths, seed=seed)
    expected = reference(repository, "p", seqs)
    # Any grouping of the same sequences into concurrent requests gives the same encodings.
    groups = [list(range(len(seqs)))[k::split] for k in range(split)]
    before = calls(engine.metrics, "p")
    results = await asyncio.gather(
        *(engine.encode(request("p", [seqs[i] for i in g])) for g in groups if g)
    )
    # ...computed together: requests that arrive together share one model call.
    assert calls(engine.metrics, "p") - before == 1
    for group, result in zip([g for g in groups if g], results, strict=True):
        np.testing.assert_allclose(result.encodings, expected[group], rtol=1e-5, atol=1e-6)


# -- regrouping: closed-loop callers come back to full batches (service/core/encode_batcher.py) ----


def histogram(metrics: Metrics, name: str, model: str, **labels: str) -> tuple[float, float]:
    """(count, sum) of a histogram of the injected registry for version 1 of `model`."""
    labels = {"model": model, "version": "1", **labels}
    return sample(metrics, f"{name}_count", **labels), sample(metrics, f"{name}_sum", **labels)


def since(now: tuple[float, float], before: tuple[float, float]) -> tuple[float, float]:
    return now[0] - before[0], now[1] - before[1]


async def closed_loop(
    engine: Engine, callers: int, rounds: int, seqs: list[np.ndarray], back_s: float
) -> None:
    """`callers` concurrent clients, each sending one sequence, then coming back after a
    random pause of up to `back_s` (a network round trip), `rounds` times."""
    rng = np.random.default_rng(callers)
    pauses = rng.uniform(0.0, back_s, (callers, rounds))

    async def caller(index: int) -> None:
        for r in range(rounds):
            await engine.encode(request("m", [seqs[(index + r) % len(seqs)]]))
            await asyncio.sleep(float(pauses[index, r]))

    await asyncio.gather(*(caller(i) for i in range(callers)))


async def test_a_lone_caller_never_waits_for_others(
    repository: Path, start_engine: StartEngine, metrics: Metrics
) -> None:
    # A slow-ish model and the largest wait allowed: a wrongly held lone caller would queue
    # for 4× the compute time of its previous batch.
    write_model(repository, "m", input_size=FEATURES, hidden_size=256)
    engine = await start_engine(regroup_fraction=4.0, regroup_max_ms=10_000.0)
    seq = features([300], seed=20)[0]
    queue_before = histogram(metrics, "rnnserve_queue_duration_seconds", "m")
    compute_before = histogram(metrics, "rnnserve_compute_duration_seconds", "m", kind="encode")
    for _ in range(10):
        await engine.encode(request("m", [seq]))
    queued, queue_s = since(
        histogram(metrics, "rnnserve_queue_duration_seconds", "m"), queue_before
    )
    computed, compute_s = since(
        histogram(metrics, "rnnserve_compute_duration_seconds", "m", kind="encode"),
        compute_before,
    )
    assert queued == computed == 10  # one batch of 1 per call
    # NOTE: compared with the compute time of the same calls, so that machine load cancels.
    assert queue_s / queued < 0.5 * compute_s / computed


async def test_closed_loop_callers_come_back_to_batches(
    repository: Path, start_engine: StartEngine, metrics: Metrics
) -> None:
    write_model(repository, "m", input_size=FEATURES, hidden_size=64)
    seqs = features([120] * 16, seed=21)
    callers, rounds = 12, 12
    means = {}
    for fraction in (0.0, 4.0):
        engine = await start_engine(regroup_fraction=fraction, regroup_max_ms=1000.0)
        before = histogram(metrics, "rnnserve_batch_size", "m", kind="encode")
        await closed_loop(engine, callers, rounds, seqs, back_s=0.002)
        count, total = since(histogram(metrics, "rnnserve_batch_size", "m", kind="encode"), before)
        assert total == callers * rounds
        means[fraction] = total / count
        await engine.drain(2.0)
    # Two alternating batches of about half the callers (the pipeline's target size); with
    # regrouping, returning callers wait for each other instead of trickling in one by one.
    assert means[4.0] >= callers / 3, means
    assert means[4.0] > means[0.0], means


async def test_the_next_batch_waits_on_the_device_behind_the_running_one(
    repository: Path, start_engine: StartEngine, metrics: Metrics
) -> None:
    # A batch of 8 × 1000 steps on a 2-layer LSTM of 512: hundreds of ms on one CPU thread.
    write_model(
        repository,
        "m",
        input_size=FEATURES,
        hidden_size=512,
        num_layers=2,
        serving={"max_delay_ms": 10_000.0},
    )
    engine = await start_engine()
    batcher = engine.registry.resolve("m").batcher
    assert batcher is not None
    # One batch first: the batcher learns the compute time per step from it.
    await engine.encode(request("m", features([1000] * 8, seed=22)))
    slow = asyncio.ensure_future(engine.encode(request("m", features([1000] * 8, seed=23))))
    await asyncio.sleep(0.02)
    assert engine.executor.pending == 1  # the first batch computes
    # 8 rows running, q queued: the next batch's target is half of (8 + q) rows.
    queued = [
        asyncio.ensure_future(engine.encode(request("m", features([5], seed=30 + i))))
        for i in range(7)
    ]
    await asyncio.sleep(0.02)
    assert batcher.target_size() == 8 and batcher.queue_depth == 7
    # Below its target, and the running batch far from its end: it waits.
    assert engine.executor.pending == 1
    queued.append(asyncio.ensure_future(engine.encode(request("m", features([5], seed=40)))))
    await asyncio.sleep(0.02)
    # At its target it goes to the device at once, queued behind the running batch.
    assert not slow.done()
    assert engine.executor.pending == 2 and batcher.queue_depth == 0
    await asyncio.gather(slow, *queued)
    count, total = batches(metrics, "m")
    assert (count, total) == (3, 24)  # three batches of 8


@pytest.mark.parametrize("max_ms", [10_000.0, 4.0])
async def test_waiting_for_returning_callers_never_exceeds_its_bound(
    repository: Path, start_engine: StartEngine, metrics: Metrics, max_ms: float
) -> None:
    write_model(repository, "m", input_size=FEATURES, hidden_size=256)
    fraction = 1.0
    engine = await start_engine(regroup_fraction=fraction, regroup_max_ms=max_ms)
    seqs = features([300] * 4, seed=22)
    compute_before = histogram(metrics, "rnnserve_compute_duration_seconds", "m", kind="encode")
    # Four callers in one batch; then only one of them comes back.
    await asyncio.gather(*(engine.encode(request("m", [s])) for s in seqs))
    computed, compute_s = since(
        histogram(metrics, "rnnserve_compute_duration_seconds", "m", kind="encode"),
        compute_before,
    )
    assert computed == 1
    bound = min(fraction * compute_s, max_ms / 1000.0)
    queue_before = histogram(metrics, "rnnserve_queue_duration_seconds", "m")
    start = time.monotonic()
    await engine.encode(request("m", seqs[:1]))
    elapsed = time.monotonic() - start
    queued, waited = since(histogram(metrics, "rnnserve_queue_duration_seconds", "m"), queue_before)
    assert queued == 1
    # It waited for the three others (about the bound), then ran alone.
    # (the slack above it: a loaded host wakes the batching task late)
    assert 0.5 * bound <= waited <= bound + 0.1, (waited, bound)
    assert elapsed >= waited
    # And the next batch of one expects only its own caller back: no wait.
    queue_before = histogram(metrics, "rnnserve_queue_duration_seconds", "m")
    await engine.encode(request("m", seqs[:1]))
    _, again = since(histogram(metrics, "rnnserve_queue_duration_seconds", "m"), queue_before)
    assert again < 0.5 * bound, (again, bound)


@pytest.mark.parametrize(("halve", "expected"), [(True, (2, 48)), (False, (1, 48))])
async def test_queued_rows_split_into_two_balanced_batches_on_the_cpu(
    repository: Path,
    start_engine: StartEngine,
    metrics: Metrics,
    halve: bool,
    expected: tuple[int, int],
) -> None:
    write_model(repository, "m", input_size=FEATURES, serving={"max_delay_ms": 10_000.0})
    engine = await start_engine()
    batcher = engine.registry.resolve("m").batcher
    assert batcher is not None
    # NOTE: the registry halves on the CPU only; a GPU batcher keeps batches whole.
    batcher.halve = halve
    seqs = features([6] * 48, seed=50)
    async with device_held(engine):
        pending = [asyncio.ensure_future(engine.encode(request("m", [s]))) for s in seqs]
        await asyncio.sleep(0.02)
        assert batcher.queue_depth == 48
    await asyncio.gather(*pending)
    # Halved: 24 now and 24 queued right behind them, so one half's callers can turn around
    # while the other half computes; whole: one batch of 48.
    assert batches(metrics, "m") == expected


# -- the batch compute's stages, row by row (service/core/encode_batcher.py EncodeCompute) ---------


@pytest.mark.parametrize("pad_on_loop_bytes", [batching.PAD_ON_LOOP_BYTES, 0])
@pytest.mark.parametrize(
    ("cell", "layers", "bidirectional"),
    [("lstm", 2, False), ("gru", 1, True), ("rnn", 2, False)],
)
@settings(
    max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    rows=st.lists(
        st.tuples(
            st.integers(1, 12),  # length
            st.sampled_from([None, "last", "mean", "max", "none"]),  # pooling
            st.booleans(),  # starts from a state of its own
            st.booleans(),  # wants its final state back
        ),
        min_size=1,
        max_size=6,
    ),
    every_row_has_a_state=st.booleans(),  # the streaming batch: states stacked in one call
    seed=st.integers(0, 2**16),
)
def test_property_every_row_of_a_batch_equals_the_row_computed_alone(
    tmp_path: Path,
    cell: str,
    layers: int,
    bidirectional: bool,
    rows: list[tuple[int, str | None, bool, bool]],
    every_row_has_a_state: bool,
    seed: int,
    pad_on_loop_bytes: int,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # 0: every batch is padded on the device thread (as large batches are).
    monkeypatch.setattr(batching, "PAD_ON_LOOP_BYTES", pad_on_loop_bytes)
    path = tmp_path / f"{cell}{layers}{bidirectional}"
    if not path.exists():
        shape = {"cell": cell, "num_layers": layers, "bidirectional": bidirectional}
        write_model(path, "m", input_size=FEATURES, **shape)
    model = checkpoint.load(path / "m" / "1").model
    assert isinstance(model, EncoderModel)
    states = layers * (2 if bidirectional else 1)
    compute = EncodeCompute(model, torch.device("cpu"), torch.float32, (states, HIDDEN))
    rng = np.random.default_rng(seed)
    loop = asyncio.new_event_loop()
    try:
        items = []
        for length, pooling, own_state, return_state in rows:
            state = None
            if own_state or every_row_has_a_state:
                parts = 2 if cell == "lstm" else 1
                state = tuple(
                    rng.standard_normal((states, HIDDEN)).astype(np.float32) for _ in range(parts)
                )
            items.append(
                Item(
                    rng.standard_normal((length, FEATURES)).astype(np.float32),
                    loop.create_future(),
                    pooling,  # type: ignore[arg-type]
                    None,
                    state,
                    return_state,
                )
            )
        with torch.inference_mode():
            prepared = compute.prepare(items)
            batch_rows = compute.rows(prepared, compute.run(prepared))
            for item, row in zip(items, batch_rows, strict=True):
                initial = None
                if item.initial_state is not None:
                    tensors = [torch.from_numpy(a)[:, None] for a in item.initial_state]
                    initial = (tensors[0], tensors[1]) if len(tensors) == 2 else tensors[0]
                pooling = item.pooling or model.config.pooling
                alone = model(
                    torch.from_numpy(item.sequence)[None],
                    torch.tensor([item.length]),
                    pooling,
                    initial,
                )
                expected = alone.encodings[0].numpy()
                np.testing.assert_allclose(row.encoding, expected, rtol=1e-5, atol=1e-5)
                assert (row.final_state is not None) == item.return_state
                if row.final_state is not None:
                    final = alone.final_state
                    parts = final if isinstance(final, tuple) else (final,)
                    for got, want in zip(row.final_state, parts, strict=True):
                        assert got.flags.owndata  # a copy: never a view of the batch
                        np.testing.assert_allclose(got, want[:, 0].numpy(), rtol=1e-5, atol=1e-5)
    finally:
        loop.close()


def test_a_batch_asks_for_final_states_only_when_a_row_wants_its_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # NOTE: without final states a long unequal batch runs fewer, longer segments with no
    # replays (models.recurrent.run_rnn_outputs): plain encodes must not ask for them.
    write_model(tmp_path, "m", input_size=FEATURES)
    model = checkpoint.load(tmp_path / "m" / "1").model
    assert isinstance(model, EncoderModel)
    asked: list[bool] = []
    real = model.forward

    def spy(*args: object, return_state: bool = True) -> object:
        asked.append(return_state)
        return real(*args, return_state=return_state)  # type: ignore[arg-type]

    monkeypatch.setattr(model, "forward", spy)
    compute = EncodeCompute(model, torch.device("cpu"), torch.float32, (1, HIDDEN))
    loop = asyncio.new_event_loop()
    try:
        for wanted in ((False, False), (False, True)):
            items = [
                Item(sequence, loop.create_future(), None, None, None, wants)
                for sequence, wants in zip(features([5, 3], seed=1), wanted, strict=True)
            ]
            with torch.inference_mode():
                prepared = compute.prepare(items)
                rows = compute.rows(prepared, compute.run(prepared))
            assert [row.final_state is not None for row in rows] == list(wanted)
    finally:
        loop.close()
    assert asked == [False, True]
