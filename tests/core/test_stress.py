"""Concurrency stress of the serving core: many callers of every decode mode (greedy, beam,
streamed, cancelled mid-stream; closed-loop and open-loop arrivals) and encodes with pooling
"none" at once for a few seconds, every answer checked against the offline result.

Three threads share the scheduler's state: the event loop, the prefill thread and the device
thread. A structure one of them changes while another reads it without a guard breaks only when
a thread switch lands inside the read: rare per event, certain over hours of traffic. To make
such a switch likely within seconds, `interleaved` makes the loop thread pause briefly (releasing
the GIL) at every third line it runs in the decode scheduler's module, so the worker threads run
inside the loop's critical sections as often as they can. Nothing is replaced: the real engine,
scheduler, batcher and models run; only their timing is perturbed. (Before the scheduler's
ownership fix this failed in 5 of 6 runs: "deque mutated during iteration", and every later
request was refused; encodes with pooling "none" of equal lengths came back non-contiguous.)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np
import pytest
import torch

import service.core.decode_scheduler
from models import checkpoint
from service.core.engine import Engine
from service.core.types import EncodeRequest, GenerateRequest, GenerateResult, TokenEvent
from tests.factories import CHAR_VOCAB, write_model
from tests.support import StartEngine

pytestmark = pytest.mark.timeout(120)

STRESS_S = 3.0
MAX_LENGTH = 12
LETTERS = "abcdefghij "
FEATURES = 4


@contextlib.contextmanager
def interleaved(every: int = 3, pause_s: float = 50e-6) -> Iterator[None]:
    """Pause the calling (loop) thread for `pause_s` at every `every`-th line it runs in the
    decode scheduler's module; the server's own GIL switch interval (15 µs) is set meanwhile."""
    files = {service.core.decode_scheduler.__file__}
    count = 0

    def local(frame: FrameType, event: str, arg: Any) -> Any:
        nonlocal count
        if event == "line":
            count += 1
            if count % every == 0:
                time.sleep(pause_s)
        return local

    def calls(frame: FrameType, event: str, arg: Any) -> Any:
        return local if frame.f_code.co_filename in files else None

    interval = sys.getswitchinterval()
    sys.setswitchinterval(15e-6)
    sys.settrace(calls)
    try:
        yield
    finally:
        sys.settrace(None)
        sys.setswitchinterval(interval)


def offline_generate(path: Path, texts: list[str], beam: int) -> dict[str, list[int]]:
    loaded = checkpoint.load(path)
    out: dict[str, list[int]] = {}
    for text in texts:
        ids = torch.tensor([[CHAR_VOCAB.index(c) for c in text]])
        with torch.inference_mode():
            out[text] = loaded.model.generate(  # type: ignore[union-attr]
                ids, torch.tensor([len(text)]), max_length=MAX_LENGTH, beam_size=beam
            )[0]
    return out


def offline_steps(path: Path, sequence: np.ndarray) -> np.ndarray:
    """Every step's output of one sequence encoded alone (pooling "none")."""
    loaded = checkpoint.load(path)
    inputs = torch.from_numpy(sequence)[None]
    with torch.inference_mode():
        out = loaded.model(inputs, torch.tensor([len(sequence)]), "none")
    return out.encodings[0].numpy()


async def test_every_decode_mode_and_pooling_none_under_concurrency_equal_offline(
    repository: Path, start_engine: StartEngine, caplog: pytest.LogCaptureFixture
) -> None:
    s2s = write_model(
        repository, "s2s", task="seq2seq", input_type="text", attention=True, max_length=MAX_LENGTH
    )
    enc = write_model(repository, "enc", input_type="features", input_size=FEATURES, seed=3)
    rng = random.Random(0)
    texts = ["".join(rng.choice(LETTERS) for _ in range(rng.randint(1, 9))) for _ in range(12)]
    greedy_expected = offline_generate(s2s, texts, 1)
    beam_expected = offline_generate(s2s, texts, 3)
    gen = np.random.default_rng(0)
    # Equal lengths (the recurrent layer's unpacked path) and mixed ones.
    sequences = [gen.normal(size=(n, FEATURES)).astype(np.float32) for n in (5, 5, 5, 3, 8, 1)]
    steps_expected = [offline_steps(enc, s) for s in sequences]
    engine = await start_engine()
    checked = dict.fromkeys(("greedy", "open", "beam", "stream", "cancelled", "none"), 0)
    stop = time.monotonic() + STRESS_S

    async def greedy(k: int) -> None:
        r = random.Random(k)
        while time.monotonic() < stop:
            batch = r.sample(texts, r.randint(1, 3))
            result = await engine.generate(GenerateRequest("s2s", batch, "text"))
            assert [o.tokens for o in result.outputs] == [greedy_expected[t] for t in batch]
            checked["greedy"] += 1

    async def one_open(text: str) -> None:
        result = await engine.generate(GenerateRequest("s2s", [text], "text"))
        assert result.outputs[0].tokens == greedy_expected[text]
        checked["open"] += 1

    async def open_loop() -> None:
        # Requests arrive whether or not earlier ones were answered (many in flight at once).
        r = random.Random(99)
        pending: set[asyncio.Task[None]] = set()
        while time.monotonic() < stop:
            if len(pending) < 32:
                task = asyncio.ensure_future(one_open(r.choice(texts)))
                pending.add(task)
                task.add_done_callback(pending.discard)
            await asyncio.sleep(0)
        await asyncio.gather(*pending)

    async def beam(k: int) -> None:
        r = random.Random(k)
        while time.monotonic() < stop:
            text = r.choice(texts)
            result = await engine.generate(GenerateRequest("s2s", [text], "text", beam_size=3))
            assert result.outputs[0].tokens == beam_expected[text]
            checked["beam"] += 1

    async def stream(k: int) -> None:
        r = random.Random(k)
        while time.monotonic() < stop:
            text = r.choice(texts)
            tokens: list[int] = []
            result = None
            async for event in engine.generate_stream(GenerateRequest("s2s", [text], "text")):
                if isinstance(event, TokenEvent):
                    tokens.append(event.token)
                else:
                    result = event
            assert isinstance(result, GenerateResult)
            assert tokens == result.outputs[0].tokens == greedy_expected[text]
            checked["stream"] += 1

    async def cancelled(k: int) -> None:
        r = random.Random(k)
        while time.monotonic() < stop:
            text = r.choice(texts)
            tokens: list[int] = []
            request = GenerateRequest("s2s", [text], "text")
            async with contextlib.aclosing(engine.generate_stream(request)) as events:
                async for event in events:
                    if isinstance(event, TokenEvent):
                        tokens.append(event.token)
                    if len(tokens) >= 1 + k % 3:
                        break  # the client goes away mid-stream
            assert tokens == greedy_expected[text][: len(tokens)]
            checked["cancelled"] += 1

    async def pooling_none(k: int) -> None:
        r = random.Random(k)
        while time.monotonic() < stop:
            chosen = r.sample(range(len(sequences)), r.randint(1, len(sequences)))
            result = await engine.encode(
                EncodeRequest("enc", [sequences[i] for i in chosen], "features", pooling="none")
            )
            for i, encoding in zip(chosen, result.encodings, strict=True):
                assert encoding.flags.c_contiguous
                np.testing.assert_allclose(encoding, steps_expected[i], atol=1e-5)
            checked["none"] += 1

    with interleaved(), caplog.at_level(logging.ERROR):
        await asyncio.gather(
            *(greedy(k) for k in range(3)),
            open_loop(),
            *(beam(k) for k in range(2)),
            *(stream(k) for k in range(2)),
            *(cancelled(k) for k in range(3)),
            *(pooling_none(k) for k in range(2)),
        )
    assert all(n > 0 for n in checked.values()), checked
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    await _settled(engine)


async def _settled(engine: Engine) -> None:
    """Every slot and queue of the seq2seq model is free again, and it still serves."""
    scheduler = engine.registry.resolve("s2s").decoder
    assert scheduler is not None and scheduler.failure is None
    for _ in range(100):
        if scheduler.slots_in_use == 0 and scheduler.queue_depth == 0:
            break
        await asyncio.sleep(0.01)
    assert (scheduler.slots_in_use, scheduler.queue_depth) == (0, 0)
    assert engine.ready
