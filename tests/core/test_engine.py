"""The Engine's typed API over a real repository: inputs, errors, models, readiness, reload."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from models import checkpoint
from service.core.engine import Engine
from service.core.errors import Draining, InvalidInput, NotFound, NotReady
from service.core.metrics import Metrics
from service.core.settings import Settings
from service.core.types import ChunkRequest, EncodeRequest, GenerateRequest
from tests.factories import CHAR_VOCAB, write_model
from tests.support import StartEngine, sample

FEATURES = 8


def feats(*lengths: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((n, FEATURES)).astype(np.float32) for n in lengths]


def direct(path: Path, seqs: list[np.ndarray], pooling: str | None = None) -> np.ndarray:
    loaded = checkpoint.load(path)
    tensors = [torch.from_numpy(s) for s in seqs]
    lengths = torch.tensor([len(s) for s in seqs])
    with torch.inference_mode():
        out = loaded.model(torch.nn.utils.rnn.pad_sequence(tensors, True), lengths, pooling)
    return out.encodings.numpy()


async def test_encode_features_with_head_labels(
    repository: Path, start_engine: StartEngine
) -> None:
    path = write_model(repository, "m", input_size=FEATURES, head=["neg", "pos"], pooling="mean")
    engine = await start_engine()
    seqs = feats(3, 6, seed=1)
    result = await engine.encode(EncodeRequest("m", seqs, "features"))
    assert (result.model, result.version) == ("m", 1)
    np.testing.assert_allclose(result.encodings, direct(path, seqs), rtol=1e-5, atol=1e-6)
    assert result.scores is not None and result.scores.shape == (2, 2)
    np.testing.assert_allclose(result.scores.sum(axis=1), 1.0, rtol=1e-5)
    assert result.labels == [["neg", "pos"][i] for i in result.scores.argmax(axis=1)]

    none = await engine.encode(EncodeRequest("m", seqs, "features", pooling="none"))
    assert isinstance(none.encodings, list)
    assert [e.shape for e in none.encodings] == [(3, 16), (6, 16)]


async def test_encode_tokens_and_text(repository: Path, start_engine: StartEngine) -> None:
    write_model(repository, "tok", input_type="tokens", cell="rnn")
    text_path = write_model(repository, "txt", input_type="text", cell="gru")
    engine = await start_engine()
    tokens = await engine.encode(EncodeRequest("tok", [np.array([1, 2, 3]), [4, 5]], "tokens"))
    assert np.asarray(tokens.encodings).shape == (2, 16)
    text = await engine.encode(EncodeRequest("txt", ["hello world", "a"], "text"))
    ids = [[CHAR_VOCAB.index(c) for c in s] for s in ("hello world", "a")]
    expected = direct(text_path, [np.array(i, dtype=np.int64) for i in ids])
    np.testing.assert_allclose(text.encodings, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("kind", "sequences", "field", "words"),
    [
        ("features", [np.zeros((3, FEATURES + 1), np.float32)], "inputs[0]", str(FEATURES)),
        ("features", [np.zeros((0, FEATURES), np.float32)], "inputs[0]", "empty"),
        ("features", [np.zeros((2049, FEATURES), np.float32)], "inputs[0]", "2048"),
        (
            "features",
            [np.zeros((2, FEATURES)), np.full((2, FEATURES), np.nan)],
            "inputs[1][0]",
            "NaN",
        ),
        ("features", [np.zeros((2, FEATURES))] * 1025, "inputs", "1024"),
        ("tokens", [[1, 2]], "tokens", "features"),
        ("text", ["abc"], "texts", "inputs"),
        ("features", [], "inputs", "at least one"),
    ],
)
async def test_invalid_input_names_field_and_limit(
    repository: Path,
    start_engine: StartEngine,
    kind: str,
    sequences: list[np.ndarray],
    field: str,
    words: str,
) -> None:
    write_model(repository, "m", input_size=FEATURES)
    engine = await start_engine()
    with pytest.raises(InvalidInput) as caught:
        await engine.encode(EncodeRequest("m", sequences, kind))  # type: ignore[arg-type]
    assert caught.value.field == field
    assert words in str(caught.value)


async def test_token_and_text_limits(repository: Path, start_engine: StartEngine) -> None:
    write_model(repository, "tok", input_type="tokens", vocab_size=20)
    write_model(repository, "txt", input_type="text")
    engine = await start_engine(max_text_length=10)
    with pytest.raises(InvalidInput, match=r"tokens\[0\]\[2\]: token id 20 is outside \[0, 20\)"):
        await engine.encode(EncodeRequest("tok", [[1, 2, 20]], "tokens"))
    with pytest.raises(InvalidInput, match=r"texts\[1\]: 11 characters; the limit is 10"):
        await engine.encode(EncodeRequest("txt", ["ok", "x" * 11], "text"))
    with pytest.raises(InvalidInput, match="pooling"):
        await engine.encode(EncodeRequest("txt", ["ok"], "text", pooling="avg"))  # type: ignore[arg-type]
    with pytest.raises(InvalidInput, match="model 'txt' is an encode model; use encode"):
        await engine.generate(GenerateRequest("txt", ["ok"], "text"))
    with pytest.raises(InvalidInput, match="timeout_ms"):
        await engine.encode(EncodeRequest("txt", ["ok"], "text", timeout_s=-1.0))


async def test_unknown_model_and_version(repository: Path, start_engine: StartEngine) -> None:
    write_model(repository, "m", input_size=FEATURES)
    engine = await start_engine()
    with pytest.raises(NotFound, match="'nope'"):
        await engine.encode(EncodeRequest("nope", feats(2), "features"))
    with pytest.raises(NotFound, match="version 7"):
        await engine.encode(EncodeRequest("m", feats(2), "features", version=7))
    with pytest.raises(NotFound):
        engine.model_info("nope")
    with pytest.raises(InvalidInput, match="model: a model name is 1–200 letters"):
        await engine.load("../etc")
    # A made-up name is echoed cut short: gRPC carries the message in size-limited metadata.
    with pytest.raises(NotFound) as refused:
        await engine.encode(EncodeRequest("x" * 100_000, feats(2), "features"))
    assert len(str(refused.value)) < 300 and "(100000 characters)" in str(refused.value)


async def test_a_bad_checkpoint_does_not_stop_the_others(
    repository: Path, start_engine: StartEngine, metrics: Metrics
) -> None:
    write_model(repository, "good", input_size=FEATURES)
    bad = write_model(repository, "bad", input_size=FEATURES, seed=1)
    (bad / "model.safetensors").write_bytes(b"not a safetensors file")
    engine = await start_engine(strict_readiness=False)
    assert engine.ready  # relaxed: at least one model READY
    info = engine.model_info("bad")
    assert [v.state for v in info.versions] == ["FAILED"]
    assert info.versions[0].reason and "model.safetensors" in info.versions[0].reason
    with pytest.raises(NotReady, match="FAILED"):
        await engine.encode(EncodeRequest("bad", feats(2), "features"))
    assert len((await engine.encode(EncodeRequest("good", feats(2), "features"))).encodings) == 1
    state = {"model": "bad", "version": "1"}
    assert sample(metrics, "rnnserve_model_state", **state, state="FAILED") == 1
    assert sample(metrics, "rnnserve_model_state", model="good", version="1", state="READY") == 1


async def test_strict_readiness_needs_every_configured_model(
    repository: Path, start_engine: StartEngine
) -> None:
    write_model(repository, "good", input_size=FEATURES)
    engine = await start_engine(models=["good", "missing"])
    assert engine.live and not engine.ready
    assert [m.name for m in engine.list_models()] == ["good", "missing"]
    relaxed = await start_engine(models=["good", "missing"], strict_readiness=False)
    assert relaxed.ready


async def test_version_policy_and_model_info(repository: Path, start_engine: StartEngine) -> None:
    for version in (1, 2, 3):
        write_model(repository, "m", version, input_size=FEATURES, seed=version)
    engine = await start_engine(version_policy="latest:2")
    info = engine.model_info("m")
    assert [(v.version, v.state) for v in info.versions] == [(2, "READY"), (3, "READY")]
    assert info.architecture["encoder"]["cell"] == "lstm"
    assert engine.model_config("m")[0] == 3
    result = await engine.encode(EncodeRequest("m", feats(2), "features", version=2))
    assert result.version == 2


async def test_load_unload_and_failed_reload_keeps_serving(
    repository: Path, start_engine: StartEngine
) -> None:
    write_model(repository, "m", 1, input_size=FEATURES)
    engine = await start_engine()
    path2 = write_model(repository, "m", 2, input_size=FEATURES, seed=2)
    await engine.load("m", 2)
    assert (await engine.encode(EncodeRequest("m", feats(2), "features"))).version == 2
    await engine.unload("m", 2)
    assert (await engine.encode(EncodeRequest("m", feats(2), "features"))).version == 1
    # A broken version 2 on disk: the reload fails, version 1 keeps serving.
    (path2 / "config.json").write_text("{")
    with pytest.raises(NotReady, match="failed to reload"):
        await engine.reload("m")
    assert (await engine.encode(EncodeRequest("m", feats(2), "features"))).version == 1
    await engine.unload("m")
    with pytest.raises(NotFound):
        await engine.encode(EncodeRequest("m", feats(2), "features"))


async def test_hot_reload_under_traffic_has_no_failed_request(
    repository: Path, start_engine: StartEngine
) -> None:
    write_model(repository, "m", 1, input_size=FEATURES, seed=1)
    engine = await start_engine()
    seqs = feats(4, 9, seed=3)
    old = direct(repository / "m" / "1", seqs)
    stop = asyncio.Event()
    answers: list[np.ndarray] = []

    async def client() -> int:
        count = 0
        while not stop.is_set():
            result = await engine.encode(EncodeRequest("m", seqs, "features"))
            answers.append(np.asarray(result.encodings))
            count += 1
            await asyncio.sleep(0)
        return count

    clients = [asyncio.ensure_future(client()) for _ in range(4)]
    await asyncio.sleep(0.05)
    # Rebuild version 1 in place from new weights, then move to version 2.
    shutil.rmtree(repository / "m" / "1")
    write_model(repository, "m", 1, input_size=FEATURES, seed=7)
    await engine.reload("m")
    await asyncio.sleep(0.05)
    write_model(repository, "m", 2, input_size=FEATURES, seed=8)
    await engine.reload("m")
    await asyncio.sleep(0.05)
    stop.set()
    counts = await asyncio.gather(*clients)  # any failed request would raise here
    assert min(counts) > 0
    new = direct(repository / "m" / "2", seqs)
    np.testing.assert_allclose(answers[-1], new, rtol=1e-5, atol=1e-6)
    assert any(np.allclose(a, old, atol=1e-6) for a in answers)
    assert [v.version for v in engine.model_info("m").versions] == [2]


async def test_draining_engine_refuses_new_work(
    repository: Path, start_engine: StartEngine
) -> None:
    write_model(repository, "m", input_size=FEATURES)
    engine: Engine = await start_engine()
    await engine.drain(1.0)
    assert engine.draining and not engine.ready and engine.live
    with pytest.raises(Draining):
        await engine.encode(EncodeRequest("m", feats(2), "features"))


async def test_metrics_move(repository: Path, start_engine: StartEngine, metrics: Metrics) -> None:
    write_model(repository, "m", input_size=FEATURES)
    engine = await start_engine()
    labels = {"model": "m", "version": "1"}
    assert sample(metrics, "rnnserve_model_load_duration_seconds_count", **labels) == 1
    assert sample(metrics, "rnnserve_model_state", **labels, state="READY") == 1
    await engine.encode(EncodeRequest("m", feats(2, 6), "features"))
    assert sample(metrics, "rnnserve_batch_size_sum", **labels, kind="encode") == 2
    assert sample(metrics, "rnnserve_batch_timesteps_sum", **labels) == 8
    assert sample(metrics, "rnnserve_padding_efficiency_sum", **labels) == pytest.approx(8 / 12)
    assert sample(metrics, "rnnserve_queue_duration_seconds_count", **labels) == 2
    assert sample(metrics, "rnnserve_compute_duration_seconds_count", **labels, kind="encode") == 1
    assert sample(metrics, "rnnserve_queue_depth", **labels, kind="encode") == 0
    assert sample(metrics, "rnnserve_inflight_requests", model="m") == 0
    await engine.unload("m")
    assert sample(metrics, "rnnserve_model_state", **labels, state="READY") == 0


async def test_stream_chunks_continue_from_the_carried_state(
    repository: Path, start_engine: StartEngine
) -> None:
    path = write_model(repository, "m", input_size=FEATURES, cell="lstm", num_layers=2)
    engine = await start_engine()
    (whole,) = feats(10, seed=4)
    first = await engine.encode_chunk(ChunkRequest("m", 1, whole[:4], "features", None, None))
    second = await engine.encode_chunk(
        ChunkRequest("m", 1, whole[4:], "features", first.final_state, None)
    )
    expected = direct(path, [whole], pooling="none")[0]
    np.testing.assert_allclose(
        np.concatenate([first.outputs, second.outputs]), expected, rtol=1e-5, atol=1e-6
    )
    assert [s.shape for s in second.final_state] == [(2, 16), (2, 16)]


async def test_missing_repository_fails_at_start(tmp_path: Path, metrics: Metrics) -> None:
    engine = Engine(Settings(repository=tmp_path / "nowhere", device="cpu"), metrics)
    with pytest.raises(ValueError, match="is not a folder"):
        await engine.start()


async def test_a_fixed_checkpoint_loads_after_a_failure(
    repository: Path, start_engine: StartEngine, metrics: Metrics
) -> None:
    path = write_model(repository, "m", input_size=FEATURES)
    (path / "config.json").write_text('{"format": "rnnserve/v1"}')
    engine = await start_engine()
    first = engine.model_info("m").versions[0]
    assert first.state == "FAILED" and first.reason and "config.json" in first.reason
    (path / "model.safetensors").unlink()
    with pytest.raises(NotReady):
        await engine.load("m")
    shutil.rmtree(path)
    write_model(repository, "m", input_size=FEATURES)
    await engine.load("m")
    assert [v.state for v in engine.model_info("m").versions] == ["READY"]
    assert engine.ready
    assert len((await engine.encode(EncodeRequest("m", feats(3), "features"))).encodings) == 1
    assert sample(metrics, "rnnserve_model_state", model="m", version="1", state="FAILED") == 0
