"""The continuous-batching decode scheduler through the engine, with real seq2seq checkpoints."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import random
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from models import checkpoint
from models.checkpoint import save
from service.core.engine import Engine
from service.core.errors import ComputeError, DeadlineExceeded, InvalidInput, Overloaded
from service.core.metrics import Metrics
from service.core.types import EncodeRequest, GenerateRequest, GenerateResult, TokenEvent
from tests.factories import CHAR_VOCAB, TARGET_VOCAB, write_model
from tests.support import StartEngine, device_held, offline, sample

SOURCES = ["hello", "ab", "a longer source text", "xyz"]


def write_eos_model(repository: Path, **kwargs: object) -> Path:
    """A seq2seq checkpoint whose larger output weights make it emit <eos> now and then."""
    path = write_model(repository, "s2s", task="seq2seq", input_type="text", **kwargs)
    loaded = checkpoint.load(path)
    with torch.no_grad():
        loaded.model.decoder.output.weight.mul_(4)  # type: ignore[union-attr]
    target = TARGET_VOCAB if loaded.config.decoder and loaded.config.decoder.vocab else None
    return save(loaded.model, path, vocab=CHAR_VOCAB, target_vocab=target)


@pytest.mark.parametrize(("cell", "attention"), [("lstm", True), ("gru", False)])
async def test_scheduled_decoding_equals_offline_generate(
    repository: Path, start_engine: StartEngine, cell: str, attention: bool
) -> None:
    path = write_model(
        repository, "s2s", task="seq2seq", input_type="text", cell=cell, attention=attention
    )
    engine = await start_engine()
    for beam in (1, 3):
        expected = offline(path, SOURCES, beam, 12)
        # Each source from its own concurrent caller: rows join and leave a shared batch.
        results = await asyncio.gather(
            *(
                engine.generate(
                    GenerateRequest("s2s", [text], "text", max_length=12, beam_size=beam)
                )
                for text in SOURCES
            )
        )
        assert [r.outputs[0].tokens for r in results] == expected
        together = await engine.generate(
            GenerateRequest("s2s", SOURCES, "text", max_length=12, beam_size=beam)
        )
        assert [o.tokens for o in together.outputs] == expected
        assert together.outputs[0].text is not None


async def test_a_short_request_finishes_before_an_earlier_long_one(
    repository: Path, start_engine: StartEngine
) -> None:
    write_model(repository, "s2s", task="seq2seq", input_type="text", max_length=400)
    engine = await start_engine()
    finished: list[str] = []
    long_started = asyncio.Event()

    async def long() -> None:
        async for event in engine.generate_stream(GenerateRequest("s2s", ["abc"], "text")):
            if isinstance(event, TokenEvent) and event.token >= 0:
                long_started.set()
            if isinstance(event, GenerateResult):
                assert len(event.outputs[0].tokens) > 100  # still decoding when short finished
        finished.append("long")

    async def short() -> None:
        await long_started.wait()
        await engine.generate(GenerateRequest("s2s", ["xy"], "text", max_length=3))
        finished.append("short")

    await asyncio.gather(long(), short())
    assert finished == ["short", "long"]


async def test_stream_gives_every_greedy_token_then_the_result(
    repository: Path, start_engine: StartEngine
) -> None:
    write_model(repository, "s2s", task="seq2seq", input_type="text", attention=True)
    engine = await start_engine()
    events = [
        e async for e in engine.generate_stream(GenerateRequest("s2s", ["ab", "cde"], "text"))
    ]
    result = events[-1]
    assert isinstance(result, GenerateResult)
    tokens = [e for e in events[:-1] if isinstance(e, TokenEvent)]
    for index, output in enumerate(result.outputs):
        assert [e.token for e in tokens if e.index == index] == output.tokens
        assert "".join(e.text or "" for e in tokens if e.index == index) == output.text
    beam = [
        e async for e in engine.generate_stream(GenerateRequest("s2s", ["ab"], "text", beam_size=2))
    ]
    assert len(beam) == 1 and isinstance(beam[0], GenerateResult)  # beam search: final only


async def test_deadline_during_decoding_frees_the_slots(
    repository: Path, start_engine: StartEngine, metrics: Metrics
) -> None:
    write_model(repository, "s2s", task="seq2seq", input_type="text", max_length=100_000)
    engine = await start_engine()
    start = time.monotonic()
    with pytest.raises(DeadlineExceeded):
        await engine.generate(GenerateRequest("s2s", ["abc"], "text", timeout_s=0.2))
    assert time.monotonic() - start < 1.0
    await asyncio.sleep(0.05)
    labels = {"model": "s2s", "version": "1"}
    assert sample(metrics, "rnnserve_decode_slots_in_use", **labels) == 0
    steps = sample(metrics, "rnnserve_model_calls_total", **labels, kind="decode")
    await asyncio.sleep(0.05)
    assert sample(metrics, "rnnserve_model_calls_total", **labels, kind="decode") == steps


async def test_cancelled_before_admission_is_never_encoded(
    repository: Path, start_engine: StartEngine, metrics: Metrics
) -> None:
    write_model(repository, "s2s", task="seq2seq", input_type="text")
    engine = await start_engine()
    labels = {"model": "s2s", "version": "1"}
    async with device_held(engine):
        task = asyncio.ensure_future(engine.generate(GenerateRequest("s2s", ["ab"], "text")))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    await asyncio.sleep(0.05)
    # The scheduler's first step was already queued behind the held device; the cancelled row
    # is dropped at its first step boundary and never decoded further.
    assert sample(metrics, "rnnserve_model_calls_total", **labels, kind="decode") <= 1
    assert sample(metrics, "rnnserve_decode_slots_in_use", **labels) == 0


async def test_generate_limits_and_decode_queue(
    repository: Path, start_engine: StartEngine
) -> None:
    write_model(repository, "s2s", task="seq2seq", input_type="text", max_length=20)
    engine = await start_engine(max_beam_size=8, max_decode_queue=2, max_decode_slots=4)
    with pytest.raises(InvalidInput, match="beam_size: must be between 1 and 4, got 5"):
        await engine.generate(GenerateRequest("s2s", ["ab"], "text", beam_size=5))
    with pytest.raises(InvalidInput, match="max_length: must be between 1 and 20"):
        await engine.generate(GenerateRequest("s2s", ["ab"], "text", max_length=21))
    with pytest.raises(InvalidInput, match="model: model 's2s' is a seq2seq model; use generate"):
        await engine.encode(EncodeRequest("s2s", ["ab"], "text"))
    with pytest.raises(Overloaded, match="decode queue full"):
        await engine.generate(GenerateRequest("s2s", ["a", "b", "c"], "text"))


async def test_rows_never_exceed_the_decode_slots(
    repository: Path, start_engine: StartEngine, metrics: Metrics
) -> None:
    path = write_model(repository, "s2s", task="seq2seq", input_type="text", attention=True)
    engine = await start_engine(max_decode_slots=3)
    requests = [
        GenerateRequest("s2s", [text], "text", max_length=6, beam_size=beam)
        for text, beam in zip(SOURCES, (1, 2, 3, 1), strict=True)
    ]
    results = await asyncio.gather(*(engine.generate(r) for r in requests))
    for request, result in zip(requests, results, strict=True):
        assert [result.outputs[0].tokens] == offline(path, request.sequences, request.beam_size, 6)  # type: ignore[arg-type]
    labels = {"model": "s2s", "version": "1", "kind": "decode"}
    steps = sample(metrics, "rnnserve_batch_size_count", **labels)
    assert steps > 0
    assert sample(metrics, "rnnserve_batch_size_bucket", **labels, le="4.0") == steps
    assert sample(metrics, "rnnserve_batch_size_bucket", **labels, le="2.0") < steps


async def test_rows_joining_and_leaving_over_many_steps_equal_offline(
    repository: Path, start_engine: StartEngine, metrics: Metrics
) -> None:
    path = write_eos_model(repository, cell="gru", attention=True, max_length=40)
    engine = await start_engine()
    rng = random.Random(0)
    letters = "abcdefghijklmnopqrstuvwxyz "
    requests = [
        GenerateRequest(
            "s2s",
            ["".join(rng.choice(letters) for _ in range(rng.randint(1, 20)))],
            "text",
            max_length=rng.randint(1, 40),
            beam_size=3 if i % 5 == 4 else 1,
        )
        for i in range(30)
    ]
    results: dict[int, list[int]] = {}
    pending = list(enumerate(requests))

    async def caller() -> None:
        # Closed loop: each finished request is followed by the next, so newcomers keep
        # joining a batch whose rows leave at <eos>, at their own max_length or as beams end.
        while pending:
            index, request = pending.pop(0)
            result = await engine.generate(request)
            results[index] = result.outputs[0].tokens

    await asyncio.gather(*(caller() for _ in range(6)))
    for index, request in enumerate(requests):
        assert request.max_length is not None
        expected = offline(path, request.sequences, request.beam_size, request.max_length)  # type: ignore[arg-type]
        assert results[index] == expected[0], f"request {index}"
    # Both ways out were taken: <eos> before max_length, and max_length.
    lengths = [(len(results[i]), r.max_length) for i, r in enumerate(requests)]
    assert any(n < limit for n, limit in lengths) and any(n == limit for n, limit in lengths)
    # Rows shared steps: fewer decode steps than the greedy tokens alone.
    greedy = sum(len(results[i]) for i, r in enumerate(requests) if r.beam_size == 1)
    labels = {"model": "s2s", "version": "1"}
    assert sample(metrics, "rnnserve_model_calls_total", **labels, kind="decode") < greedy
    await asyncio.sleep(0.05)
    assert sample(metrics, "rnnserve_decode_slots_in_use", **labels) == 0


async def test_a_cancelled_stream_leaves_and_the_other_rows_are_unchanged(
    repository: Path, start_engine: StartEngine, metrics: Metrics
) -> None:
    path = write_model(
        repository, "s2s", task="seq2seq", input_type="text", attention=True, max_length=400
    )
    engine = await start_engine()
    labels = {"model": "s2s", "version": "1"}
    streamed: list[int] = []

    async def stream_then_leave() -> None:
        request = GenerateRequest("s2s", ["abc"], "text")
        async with contextlib.aclosing(engine.generate_stream(request)) as events:
            async for event in events:
                if isinstance(event, TokenEvent):
                    streamed.append(event.token)
                if len(streamed) == 20:
                    return  # the client goes away mid-decoding

    others = [GenerateRequest("s2s", [t], "text", max_length=30) for t in SOURCES]
    _, *results = await asyncio.gather(stream_then_leave(), *(engine.generate(r) for r in others))
    for request, result in zip(others, results, strict=True):
        assert [result.outputs[0].tokens] == offline(path, request.sequences, 1, 30)  # type: ignore[arg-type]
    assert streamed == offline(path, ["abc"], 1, 400)[0][:20]
    await asyncio.sleep(0.05)
    assert sample(metrics, "rnnserve_dropped_sequences_total", **labels, reason="cancelled") == 1
    assert sample(metrics, "rnnserve_decode_slots_in_use", **labels) == 0
    steps = sample(metrics, "rnnserve_model_calls_total", **labels, kind="decode")
    await asyncio.sleep(0.05)
    assert sample(metrics, "rnnserve_model_calls_total", **labels, kind="decode") == steps


def _patch_encode(
    engine: Engine, model: str, wrap: Callable[[Callable[..., Any]], Callable[..., Any]]
) -> None:
    """Replace the loaded seq2seq network's encode (as the scheduler calls it) by wrap(encode)."""
    network = engine.registry.resolve(model).loaded.model  # type: ignore[union-attr]
    network.encode = wrap(network.encode)  # type: ignore[method-assign]


def _fail_encodes_of_length(engine: Engine, model: str, length: int) -> None:
    """Make the model's encoder raise for any group whose longest source has `length` steps."""

    def wrap(encode: Callable[..., Any]) -> Callable[..., Any]:
        def failing(inputs: torch.Tensor, lengths: torch.Tensor) -> Any:
            if int(lengths.max()) == length:
                raise RuntimeError("encoder failure")
            return encode(inputs, lengths)

        return failing

    _patch_encode(engine, model, wrap)


async def test_newcomers_are_encoded_off_the_device_thread_while_the_batch_decodes(
    repository: Path, start_engine: StartEngine, metrics: Metrics
) -> None:
    path = write_model(repository, "s2s", task="seq2seq", input_type="text", max_length=12)
    engine = await start_engine()
    threads: list[str] = []

    def wrap(encode: Callable[..., Any]) -> Callable[..., Any]:
        def recorded(*args: Any) -> Any:
            threads.append(threading.current_thread().name)
            return encode(*args)

        return recorded

    _patch_encode(engine, "s2s", wrap)
    # The device thread is busy: encodes still happen (on the prefill thread), and their
    # requests decode as soon as the device frees up.
    async with device_held(engine):
        pending = asyncio.ensure_future(
            asyncio.gather(*(engine.generate(GenerateRequest("s2s", [t], "text")) for t in SOURCES))
        )
        for _ in range(200):
            if threads:
                break
            await asyncio.sleep(0.005)
        assert threads and not pending.done()
    results = await pending
    assert {name.split("_")[0] for name in threads} == {"rnnserve-prefill"}
    assert [r.outputs[0].tokens for r in results] == offline(path, SOURCES, 1, 12)
    # Encodes are model calls of their own kind (warm-up is outside the metrics).
    encodes = sample(metrics, "rnnserve_model_calls_total", model="s2s", version="1", kind="encode")
    assert encodes == len(threads) >= 1


async def test_a_failed_encode_fails_only_its_own_requests(
    repository: Path, start_engine: StartEngine, metrics: Metrics
) -> None:
    path = write_model(repository, "s2s", task="seq2seq", input_type="text", max_length=300)
    engine = await start_engine()
    poison = "zzzzzzz"
    _fail_encodes_of_length(engine, "s2s", len(poison))
    started = asyncio.Event()

    async def long() -> list[int]:
        async for event in engine.generate_stream(GenerateRequest("s2s", ["abc"], "text")):
            started.set()
            if isinstance(event, GenerateResult):
                return event.outputs[0].tokens
        raise AssertionError("no result")

    running = asyncio.ensure_future(long())
    await started.wait()
    with pytest.raises(ComputeError):
        await engine.generate(GenerateRequest("s2s", [poison], "text"))
    assert await running == offline(path, ["abc"], 1, 300)[0]
    await asyncio.sleep(0.05)
    assert sample(metrics, "rnnserve_decode_slots_in_use", model="s2s", version="1") == 0


async def test_drain_finishes_a_request_whose_encode_is_under_way(
    repository: Path, start_engine: StartEngine
) -> None:
    path = write_model(repository, "s2s", task="seq2seq", input_type="text", max_length=8)
    engine = await start_engine()
    entered = threading.Event()

    def wrap(encode: Callable[..., Any]) -> Callable[..., Any]:
        def slow(*args: Any) -> Any:
            entered.set()
            time.sleep(0.2)
            return encode(*args)

        return slow

    _patch_encode(engine, "s2s", wrap)
    request = asyncio.ensure_future(engine.generate(GenerateRequest("s2s", ["ab"], "text")))
    assert await asyncio.to_thread(entered.wait, 5.0)
    await engine.drain(5.0)
    assert (await request).outputs[0].tokens == offline(path, ["ab"], 1, 8)[0]


async def test_after_a_failed_step_waiting_requests_still_run_and_slots_free(
    repository: Path, start_engine: StartEngine, metrics: Metrics
) -> None:
    path = write_model(repository, "s2s", task="seq2seq", input_type="text", max_length=100_000)
    engine = await start_engine(max_decode_slots=1)
    network = engine.registry.resolve("s2s").loaded.model  # type: ignore[union-attr]
    step = network.step
    started = asyncio.Event()

    async def long() -> None:
        async for _ in engine.generate_stream(GenerateRequest("s2s", ["abc"], "text")):
            started.set()

    running = asyncio.ensure_future(long())
    await started.wait()
    # The one slot is taken: this request waits for it.
    waiting = asyncio.ensure_future(
        engine.generate(GenerateRequest("s2s", ["ab"], "text", max_length=4))
    )
    await asyncio.sleep(0.05)
    assert not waiting.done()
    failures = [RuntimeError("step failure")]

    def failing_once(*args: Any) -> Any:
        if failures:
            raise failures.pop()
        return step(*args)

    network.step = failing_once  # type: ignore[method-assign]
    with pytest.raises(ComputeError):
        await running
    # The failed batch's slot goes to the waiting request, which then runs to its end.
    result = await asyncio.wait_for(waiting, 5.0)
    assert result.outputs[0].tokens == offline(path, ["ab"], 1, 4)[0]
    await asyncio.sleep(0.05)
    assert sample(metrics, "rnnserve_decode_slots_in_use", model="s2s", version="1") == 0
    await asyncio.wait_for(engine.drain(1.0), 5.0)


async def test_a_waiting_request_is_encoded_once_it_waited_max_wait_steps_mid_burst(
    repository: Path, start_engine: StartEngine
) -> None:
    path = write_model(repository, "s2s", task="seq2seq", input_type="text", max_length=1000)
    # Too few newcomers to reach the join fraction: only max_wait_steps lets the one join.
    engine = await start_engine(decode_join_fraction=1.0, decode_max_wait_steps=4)
    scheduler = engine.registry.resolve("s2s").decoder
    assert scheduler is not None
    # NOTE: one burst is longer than the whole test: the wake-up must come from inside it.
    scheduler.max_burst = 10_000
    waited: list[int] = []

    def wrap(encode: Callable[..., Any]) -> Callable[..., Any]:
        def recorded(*args: Any) -> Any:
            waited.append(scheduler._steps)
            return encode(*args)

        return recorded

    long = [
        asyncio.ensure_future(engine.generate(GenerateRequest("s2s", [t], "text", max_length=1000)))
        for t in SOURCES
    ]
    for _ in range(400):
        if scheduler._steps >= 3:
            break
        await asyncio.sleep(0.001)
    _patch_encode(engine, "s2s", wrap)
    enqueued = scheduler._steps
    newcomer = await engine.generate(GenerateRequest("s2s", ["late"], "text", max_length=3))
    assert newcomer.outputs[0].tokens == offline(path, ["late"], 1, 3)[0]
    # Encoded a few steps after max_wait_steps (a loop turn and a thread hand-off late; ~6 on
    # a quiet machine; the device thread keeps stepping while a loaded host delays the loop,
    # hence the slack), while the long requests were still decoding, not once their burst
    # ended (~1000 steps).
    assert waited and waited[0] - enqueued <= 4 + 500, (enqueued, waited)
    assert not all(f.done() for f in long)
    await asyncio.gather(*long)


async def test_streamed_jobs_past_their_deadline_leave_no_unretrieved_exceptions(
    repository: Path, start_engine: StartEngine, caplog: pytest.LogCaptureFixture
) -> None:
    write_model(repository, "s2s", task="seq2seq", input_type="text", max_length=100_000)
    engine = await start_engine()
    request = GenerateRequest("s2s", ["abc", "de", "fghi"], "text", timeout_s=0.3)

    async def consume() -> bool:
        events = engine.generate_stream(request)
        assert isinstance(await anext(events), TokenEvent)
        # The client reads nothing while the deadline passes: the scheduler fails every job.
        await asyncio.sleep(0.6)
        try:
            async for _ in events:
                pass
        except DeadlineExceeded:
            return True
        return False

    with caplog.at_level(logging.ERROR, logger="asyncio"):
        assert await consume()
        for _ in range(3):  # the jobs' futures are freed (an exception's frames form cycles)
            gc.collect()
            await asyncio.sleep(0.01)
    assert "never retrieved" not in caplog.text


async def test_one_request_holds_at_most_its_share_of_the_decode_slots(
    repository: Path, start_engine: StartEngine, metrics: Metrics
) -> None:
    path = write_model(repository, "s2s", task="seq2seq", input_type="text", max_length=300)
    engine = await start_engine(max_decode_slots=16, max_request_decode_slots=4)
    scheduler = engine.registry.resolve("s2s").decoder
    assert scheduler is not None
    texts = ["abc", "bcd", "cde", "def", "efg", "fgh"]
    # 6 sequences × beam 4 would take 24 rows: one beam of 4 runs at a time.
    big = asyncio.ensure_future(
        engine.generate(GenerateRequest("s2s", texts, "text", beam_size=4, max_length=40))
    )
    peak = 0
    small_done = False

    async def watch() -> None:
        nonlocal peak
        while not big.done():
            peak = max(peak, scheduler.slots_in_use)
            await asyncio.sleep(0)

    watcher = asyncio.ensure_future(watch())
    await asyncio.sleep(0.02)
    small = await engine.generate(GenerateRequest("s2s", ["xy"], "text", max_length=5))
    small_done = not big.done()
    result = await big
    await watcher
    assert small_done, "the small request waited for the whole big one"
    assert small.outputs[0].tokens == offline(path, ["xy"], 1, 5)[0]
    assert [o.tokens for o in result.outputs] == offline(path, texts, 4, 40)
    assert 4 <= peak <= 4 + 1  # its one beam, plus the small request's row
    with pytest.raises(InvalidInput, match="beam_size: must be between 1 and 4, got 5"):
        await engine.generate(GenerateRequest("s2s", ["ab"], "text", beam_size=5))


async def test_one_request_of_long_sources_runs_one_sequence_at_a_time(
    repository: Path, start_engine: StartEngine
) -> None:
    path = write_model(repository, "s2s", task="seq2seq", input_type="text", max_length=30)
    # 3 rows × 20 source steps = 60 > 50: after the first, the others wait for it.
    engine = await start_engine(max_request_decode_work=50)
    scheduler = engine.registry.resolve("s2s").decoder
    assert scheduler is not None
    texts = ["a" * 20, "b" * 20, "c" * 20]
    task = asyncio.ensure_future(
        engine.generate(GenerateRequest("s2s", texts, "text", beam_size=3))
    )
    peak = 0
    while not task.done():
        peak = max(peak, scheduler.slots_in_use)
        await asyncio.sleep(0)
    assert [o.tokens for o in (await task).outputs] == offline(path, texts, 3, 30)
    assert peak == 3


async def test_a_long_decode_gives_the_device_to_another_models_batch(
    repository: Path, start_engine: StartEngine
) -> None:
    write_model(repository, "s2s", task="seq2seq", input_type="text", max_length=3000)
    write_model(repository, "enc", input_type="features", input_size=4)
    engine = await start_engine()
    scheduler = engine.registry.resolve("s2s").decoder
    assert scheduler is not None
    # NOTE: one burst would cover the whole decode: only giving the device back between steps
    # lets the encode run before it ends.
    scheduler.max_burst = 100_000
    started = asyncio.Event()

    async def long() -> None:
        async for _ in engine.generate_stream(GenerateRequest("s2s", ["abc"], "text")):
            started.set()

    decoding = asyncio.ensure_future(long())
    await started.wait()
    await engine.encode(EncodeRequest("enc", [np.zeros((3, 4), np.float32)], "features"))
    assert not decoding.done()
    await decoding


async def test_a_decode_is_one_device_call_and_every_step_is_still_recorded(
    repository: Path, start_engine: StartEngine
) -> None:
    path = write_model(repository, "s2s", task="seq2seq", input_type="text", max_length=25)
    loaded = checkpoint.load(path)
    assert loaded.config.decoder is not None
    with torch.no_grad():
        # NOTE: <eos> never wins: every row decodes max_length steps.
        loaded.model.decoder.output.bias[loaded.config.decoder.eos_id] = -1e4  # type: ignore[union-attr]
    save(loaded.model, path, vocab=CHAR_VOCAB, target_vocab=TARGET_VOCAB)
    engine = await start_engine()
    scheduler = engine.registry.resolve("s2s").decoder
    assert scheduler is not None
    scheduler.max_burst = 4
    labels = {"model": "s2s", "version": "1", "kind": "decode"}
    recorded = sample(engine.metrics, "rnnserve_model_calls_total", **labels)
    calls = engine.executor.calls
    result = await engine.generate(GenerateRequest("s2s", SOURCES, "text", max_length=25))
    assert [len(o.tokens) for o in result.outputs] == [25] * len(SOURCES)
    # The figures of the last steps go with the results; the burst itself ends just after.
    assert sample(engine.metrics, "rnnserve_model_calls_total", **labels) - recorded == 25
    for _ in range(500):
        if not scheduler._bursting:
            break
        await asyncio.sleep(0.01)
    # The device thread encoded the group and ran every step without handing the batch back to
    # the loop in between (each hand-back is two thread wake-ups); the loop still counted each
    # step and the encode.
    assert sample(engine.metrics, "rnnserve_model_calls_total", **labels) - recorded == 25
    assert engine.executor.calls - calls == 1
    encodes = sample(engine.metrics, "rnnserve_model_calls_total", **{**labels, "kind": "encode"})
    assert encodes == 1


async def test_a_failed_encode_with_nothing_running_fails_its_request_and_frees_its_slots(
    repository: Path, start_engine: StartEngine, metrics: Metrics
) -> None:
    path = write_model(repository, "s2s", task="seq2seq", input_type="text", max_length=12)
    engine = await start_engine()
    poison = "zzzzzzz"
    _fail_encodes_of_length(engine, "s2s", len(poison))
    for _ in range(3):
        with pytest.raises(ComputeError):
            await engine.generate(GenerateRequest("s2s", [poison, "ab"], "text"))
        await asyncio.sleep(0.01)
        assert sample(metrics, "rnnserve_decode_slots_in_use", model="s2s", version="1") == 0
        result = await engine.generate(GenerateRequest("s2s", SOURCES, "text", max_length=12))
        assert [o.tokens for o in result.outputs] == offline(path, SOURCES, 1, 12)
