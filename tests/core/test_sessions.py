"""Streaming sessions through the real engine: chunked == whole, no state mixing, refusals.

One engine (real checkpoints, real batcher, real executor) serves the whole module from a loop in
a background thread, so that hypothesis can drive it from plain synchronous tests.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from service.core.errors import Conflict, Draining, InvalidInput, NotFound, Overloaded
from service.core.sessions import (
    BIDIRECTIONAL_REASON,
    ChunkResult,
    SessionManager,
)
from service.core.state_tokens import StateTokenCodec, StateTokenError
from service.core.types import EncodeRequest, InputKind, Pooling, SequenceData
from tests.factories import CHARS, TOKENS_VOCAB_SIZE, write_model
from tests.support import KEY, Served

# name → (write_model kwargs, input kind); every unidirectional variant, deep ones included.
VARIANTS: dict[str, tuple[dict[str, Any], InputKind]] = {
    "rnn-tanh": ({"cell": "rnn", "nonlinearity": "tanh", "pooling": "last"}, "features"),
    "rnn-relu": ({"cell": "rnn", "nonlinearity": "relu", "pooling": "mean"}, "features"),
    "lstm": ({"cell": "lstm", "pooling": "max", "head": ["a", "b", "c"]}, "features"),
    "gru": ({"cell": "gru", "reset_after": True, "pooling": "mean", "head": 2}, "features"),
    "gru-reset-before": ({"cell": "gru", "reset_after": False, "pooling": "last"}, "features"),
    "deep-lstm": ({"cell": "lstm", "num_layers": 3, "pooling": "mean"}, "features"),
    "deep-gru-reset-before": (
        {
            "cell": "gru",
            "reset_after": False,
            "num_layers": 2,
            "pooling": "max",
            "head": ["x", "y"],
        },
        "features",
    ),
    "deep-rnn": ({"cell": "rnn", "num_layers": 2, "pooling": "last"}, "features"),
    "tokens-gru": ({"cell": "gru", "input_type": "tokens", "pooling": "mean"}, "tokens"),
    "text-lstm": ({"cell": "lstm", "input_type": "text", "num_layers": 2}, "text"),
}


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    repository = tmp_path_factory.mktemp("repository")
    for seed, (name, (kwargs, _)) in enumerate(VARIANTS.items()):
        write_model(repository, name, seed=seed, **kwargs)
    write_model(repository, "bidirectional", cell="lstm", bidirectional=True)
    write_model(repository, "seq2seq", task="seq2seq", input_type="text", cell="gru")
    server = Served(repository)
    yield server
    server.close()


def _sequence(kind: InputKind, length: int, seed: int) -> SequenceData:
    rng = np.random.default_rng(seed)
    if kind == "features":
        return rng.standard_normal((length, 8)).astype(np.float32)
    if kind == "tokens":
        return rng.integers(0, TOKENS_VOCAB_SIZE, length).astype(np.int64)
    return "".join(rng.choice(list(CHARS), length))


def _cut(sequence: SequenceData, sizes: list[int]) -> list[SequenceData]:
    chunks: list[SequenceData] = []
    at = 0
    for size in sizes:
        if at >= len(sequence):
            break
        chunks.append(sequence[at : at + size])
        at += size
    if at < len(sequence):
        chunks.append(sequence[at:])
    return chunks


async def _session_stream(
    sessions: SessionManager,
    model: str,
    kind: InputKind,
    chunks: list[SequenceData],
    pooling: Pooling | None = None,
) -> list[ChunkResult]:
    info = sessions.create(model, pooling=pooling)
    results = [await sessions.chunk(info.id, chunk, kind) for chunk in chunks]
    sessions.close(info.id)
    return results


async def _token_stream(
    sessions: SessionManager,
    model: str,
    kind: InputKind,
    chunks: list[SequenceData],
    pooling: Pooling | None = None,
) -> list[ChunkResult]:
    results: list[ChunkResult] = []
    token: bytes | None = None
    for chunk in chunks:
        result = await sessions.stream(model, chunk, kind, pooling=pooling, state_token=token)
        token = result.state_token
        assert token is not None
        results.append(result)
    return results


def _check_equal(
    served: Served,
    model: str,
    kind: InputKind,
    sequence: SequenceData,
    results: list[ChunkResult],
    pooling: Pooling | None,
) -> None:
    whole = served.run(
        served.engine.encode(EncodeRequest(model, [sequence], kind, pooling=pooling))
    )
    if pooling == "none":
        assert isinstance(whole.encodings, list)
        steps = np.concatenate([r.encoding for r in results])
        np.testing.assert_allclose(steps, whole.encodings[0], rtol=1e-4, atol=1e-5)
    else:
        np.testing.assert_allclose(results[-1].encoding, whole.encodings[0], rtol=1e-4, atol=1e-5)
    if whole.scores is not None:
        assert results[-1].scores is not None
        np.testing.assert_allclose(results[-1].scores, whole.scores[0], rtol=1e-4, atol=1e-5)
        if whole.labels is not None:
            assert results[-1].label == whole.labels[0]
    else:
        assert results[-1].scores is None


@pytest.mark.parametrize("pooling", [None, "last", "mean", "max", "none"])
@pytest.mark.parametrize("model", list(VARIANTS))
def test_chunked_equals_whole(served: Served, model: str, pooling: Pooling | None) -> None:
    kind = VARIANTS[model][1]
    sequence = _sequence(kind, 29, seed=len(model))
    chunks = _cut(sequence, [1, 7, 3, 10])
    results = served.run(_session_stream(served.sessions, model, kind, chunks, pooling))
    assert [r.steps for r in results] == [1, 8, 11, 21, 29]
    _check_equal(served, model, kind, sequence, results, pooling)


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    model=st.sampled_from(["deep-lstm", "gru-reset-before", "tokens-gru", "lstm"]),
    pooling=st.sampled_from([None, "last", "mean", "max", "none"]),
    length=st.integers(1, 40),
    sizes=st.lists(st.integers(1, 12), min_size=1, max_size=8),
    seed=st.integers(0, 1000),
)
def test_any_chunking_through_tokens_equals_whole(
    served: Served,
    model: str,
    pooling: Pooling | None,
    length: int,
    sizes: list[int],
    seed: int,
) -> None:
    kind = VARIANTS[model][1]
    sequence = _sequence(kind, length, seed)
    results = served.run(
        _token_stream(served.sessions, model, kind, _cut(sequence, sizes), pooling)
    )
    assert results[-1].steps == length
    _check_equal(served, model, kind, sequence, results, pooling)


def test_interleaved_sessions_never_mix_state(served: Served) -> None:
    models = ["lstm", "deep-gru-reset-before", "rnn-relu", "gru"]
    count = 64

    async def one(index: int) -> tuple[str, SequenceData, list[ChunkResult]]:
        model = models[index % len(models)]
        rng = np.random.default_rng(index)
        sequence = _sequence("features", int(rng.integers(5, 40)), seed=1000 + index)
        chunks = _cut(sequence, [int(s) for s in rng.integers(1, 9, size=40)])
        info = served.sessions.create(model)
        results = []
        for chunk in chunks:
            results.append(await served.sessions.chunk(info.id, chunk, "features"))
            await asyncio.sleep(float(rng.uniform(0, 0.002)))
        served.sessions.close(info.id)
        return model, sequence, results

    async def everyone() -> list[tuple[str, SequenceData, list[ChunkResult]]]:
        return await asyncio.gather(*(one(i) for i in range(count)))

    batches_before = _sample(served.registry, "rnnserve_model_calls_total")
    outcomes = served.run(everyone())
    calls = _sample(served.registry, "rnnserve_model_calls_total") - batches_before
    chunks = sum(len(results) for _, _, results in outcomes)
    # Chunks of different sessions shared model calls (the batcher gathered their states).
    assert calls < chunks
    for model, sequence, results in outcomes:
        _check_equal(served, model, "features", sequence, results, None)


def _sample(registry: CollectorRegistry, name: str) -> float:
    total = 0.0
    for metric in registry.collect():
        for sample in metric.samples:
            if sample.name == name:
                total += sample.value
    return total


def test_resume_a_session_from_its_state_token(served: Served) -> None:
    sequence = _sequence("features", 24, seed=5)
    first, second = sequence[:11], sequence[11:]

    async def scenario() -> ChunkResult:
        info = served.sessions.create("deep-lstm", return_state=True)
        token = (await served.sessions.chunk(info.id, first, "features")).state_token
        served.sessions.close(info.id)
        resumed = served.sessions.create("deep-lstm", state_token=token)
        assert resumed.steps == 11
        return await served.sessions.chunk(resumed.id, second, "features")

    result = served.run(scenario())
    _check_equal(served, "deep-lstm", "features", sequence, [result], None)


def test_models_that_cannot_stream_are_refused(served: Served) -> None:
    with pytest.raises(InvalidInput) as info:
        served.sessions.create("bidirectional")
    assert info.value.field == "model" and BIDIRECTIONAL_REASON in info.value.message
    chunk = _sequence("features", 3, 0)
    with pytest.raises(InvalidInput, match="cannot be streamed"):
        served.run(served.sessions.stream("bidirectional", chunk, "features"))
    with pytest.raises(InvalidInput, match="seq2seq"):
        served.sessions.create("seq2seq")
    with pytest.raises(NotFound):
        served.sessions.create("no-such-model")


def test_session_limit_refuses_new_sessions_and_keeps_open_ones(served: Served) -> None:
    sessions = served.manager(max_sessions=2)
    chunk = _sequence("features", 4, 1)
    first = sessions.create("lstm")
    sessions.create("gru")
    with pytest.raises(Overloaded, match="max_sessions"):
        sessions.create("lstm")
    # The open sessions were not evicted to make room.
    assert served.run(sessions.chunk(first.id, chunk, "features")).steps == 4
    sessions.close(first.id)
    sessions.create("lstm")
    served.run(sessions.stop())


def test_idle_sessions_expire_with_a_clear_error(served: Served) -> None:
    sessions = served.manager(idle_timeout_s=0.05)
    metrics = sessions._metrics
    assert metrics is not None
    chunk = _sequence("features", 4, 2)
    idle = sessions.create("lstm")
    busy = sessions.create("lstm")
    for _ in range(6):
        served.run(sessions.chunk(busy.id, chunk, "features"))
        time.sleep(0.02)
    time.sleep(0.3)  # the reaper runs every idle_timeout / 4
    assert sessions.active == 0
    for session_id in (idle.id, busy.id):
        with pytest.raises(NotFound, match=r"expired after 0\.05 s idle"):
            served.run(sessions.chunk(session_id, chunk, "features"))
    assert metrics.sessions_expired_total.labels("lstm")._value.get() == 2
    with pytest.raises(NotFound, match="no session"):
        served.run(sessions.chunk("never-opened", chunk, "features"))
    served.run(sessions.stop())


def test_one_chunk_at_a_time_per_session(served: Served) -> None:
    info = served.sessions.create("deep-lstm")
    chunk = _sequence("features", 30, 3)

    async def two_at_once() -> list[Any]:
        return await asyncio.gather(
            served.sessions.chunk(info.id, chunk, "features"),
            served.sessions.chunk(info.id, chunk, "features"),
            return_exceptions=True,
        )

    first, second = served.run(two_at_once())
    assert isinstance(first, ChunkResult) and first.steps == 30
    assert isinstance(second, Conflict)
    served.sessions.close(info.id)
    with pytest.raises(NotFound):
        served.sessions.close(info.id)


def test_active_gauge_counts_open_sessions(served: Served) -> None:
    def active() -> float:
        return served.metrics.sessions_active.labels("gru")._value.get()

    before = active()
    ids = [served.sessions.create("gru").id for _ in range(3)]
    assert active() == before + 3
    for session_id in ids:
        served.sessions.close(session_id)
    assert active() == before


def test_bad_tokens_are_refused_by_reason(served: Served) -> None:
    chunk = _sequence("features", 5, 4)
    token = served.run(served.sessions.stream("lstm", chunk, "features")).state_token
    assert token is not None
    cases: list[tuple[str, bytes, str, str]] = [
        ("gru", token, "wrong_model", "was issued for model 'lstm' version 1, not 'gru' version 1"),
        ("lstm", token[:-1], "truncated", "is truncated"),
        # A byte of the sealed state itself: only the MAC can tell.
        (
            "lstm",
            token[:40] + bytes([token[40] ^ 1]) + token[41:],
            "tampered",
            "failed its integrity check (tampered)",
        ),
    ]
    for model, bad, reason, message in cases:
        with pytest.raises(StateTokenError) as info:
            served.run(served.sessions.stream(model, chunk, "features", state_token=bad))
        assert (info.value.reason, info.value.field) == (reason, "state_token")
        assert info.value.message == f"state_token: {message}"
    other = SessionManager(served.engine, StateTokenCodec(b"another-key-0123456789abcdef"))
    with pytest.raises(StateTokenError) as info:
        other.create("lstm", state_token=token)
    assert info.value.reason == "wrong_key"
    assert "different server key" in info.value.message
    assert "RNNSERVE_STATE_KEY" in info.value.message
    # A refused token opens no session.
    active = served.sessions.active
    with pytest.raises(StateTokenError):
        served.sessions.create("gru", state_token=token)
    assert served.sessions.active == active


def test_chunk_contents_are_validated(served: Served) -> None:
    info = served.sessions.create("lstm")
    wrong_width = np.zeros((3, 5), dtype=np.float32)
    with pytest.raises(InvalidInput, match="8"):
        served.run(served.sessions.chunk(info.id, wrong_width, "features"))
    # A refused chunk leaves the session where it was.
    assert served.sessions.info(info.id).steps == 0
    served.sessions.close(info.id)


async def test_a_draining_server_opens_no_sessions(repository: Path, start_engine: Any) -> None:
    write_model(repository, "lstm", cell="lstm")
    engine = await start_engine()
    info = engine.sessions.create("lstm")
    await engine.drain(0.5)
    with pytest.raises(Draining):
        engine.sessions.create("lstm")
    # drain closed the open sessions too; their clients hear why (not "no such session")
    with pytest.raises(Draining):
        engine.sessions.info(info.id)
    with pytest.raises(Draining):
        await engine.sessions.chunk(info.id, _sequence("features", 4, 3), "features")


async def test_a_token_of_another_version_is_refused(repository: Path, start_engine: Any) -> None:
    write_model(repository, "lstm", version=1, cell="lstm", seed=1)
    write_model(repository, "lstm", version=2, cell="lstm", seed=2)
    engine = await start_engine(version_policy="all", state_key=KEY.decode())
    chunk = _sequence("features", 4, 6)
    first = await engine.sessions.stream("lstm", chunk, "features", version=1)
    assert first.version == 1 and first.state_token is not None
    with pytest.raises(StateTokenError) as info:
        await engine.sessions.stream(
            "lstm", chunk, "features", version=2, state_token=first.state_token
        )
    assert info.value.reason == "wrong_model"
    assert info.value.message == (
        "state_token: was issued for model 'lstm' version 1, not 'lstm' version 2"
    )
    with pytest.raises(StateTokenError, match="version 1, not 'lstm' version 2"):
        engine.sessions.create("lstm", 2, state_token=first.state_token)
    # The version it was issued for still takes it.
    second = await engine.sessions.stream(
        "lstm", chunk, "features", version=1, state_token=first.state_token
    )
    assert second.steps == 8


async def test_head_scores_follow_a_reload(repository: Path, start_engine: Any) -> None:
    """The host copy of the head belongs to the loaded version: a reload with new weights must
    score with them."""
    write_model(repository, "headed", cell="gru", head=["a", "b", "c"], seed=1)
    engine = await start_engine(state_key=KEY.decode())
    chunk = _sequence("features", 6, 7)

    async def streamed_and_whole() -> tuple[np.ndarray, np.ndarray]:
        streamed = await engine.sessions.stream("headed", chunk, "features")
        whole = await engine.encode(EncodeRequest("headed", [chunk], "features"))
        assert streamed.scores is not None and whole.scores is not None
        np.testing.assert_allclose(streamed.scores, whole.scores[0], rtol=1e-4, atol=1e-5)
        return streamed.scores, whole.scores[0]

    before, _ = await streamed_and_whole()
    write_model(repository, "headed", cell="gru", head=["a", "b", "c"], seed=2)
    await engine.reload("headed")
    after, _ = await streamed_and_whole()
    assert not np.allclose(before, after, rtol=1e-3, atol=1e-4)
