"""The CUDA paths: models placed on a GPU (float32, float16, bfloat16) answer like the CPU.

Skipped where there is no CUDA device (CI has none); run on a GPU machine with
`pytest -q tests/system/test_gpu.py`. Tolerances are wider than the CPU suite's: cuDNN may use TF32
(torch.backends.cudnn.allow_tf32, on by default) and picks kernels by batch shape, so a GPU
result differs from the CPU's by up to ~5e-4 on these models.
"""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch

from models.checkpoint import load
from models.encoder import EncoderModel
from service.core.types import EncodeRequest, GenerateRequest, GenerateResult, InputKind, TokenEvent
from tests.factories import CHARS, write_model
from tests.support import (
    DEMO_REPOSITORY,
    LOGPROB_ATOL,
    PRECISION_ENCODERS,
    PRECISION_SEQ2SEQ,
    StartEngine,
    random_batch,
    running_server,
)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

DEMO = DEMO_REPOSITORY

# name → write_model kwargs: every cell, deep, bidirectional, a head, tokens and text inputs.
VARIANTS: dict[str, dict[str, Any]] = {
    "lstm-deep-bi": {"cell": "lstm", "num_layers": 2, "bidirectional": True, "pooling": "mean"},
    "gru": {"cell": "gru", "pooling": "max", "head": ["a", "b", "c"]},
    "gru-reset-before": {"cell": "gru", "reset_after": False, "num_layers": 2},
    "rnn-relu": {"cell": "rnn", "nonlinearity": "relu", "pooling": "last"},
    "text-lstm": {"cell": "lstm", "input_type": "text", "head": 4},
}


def _inputs(kind: InputKind, count: int, seed: int) -> list[Any]:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 40, count)
    if kind == "text":
        return ["".join(rng.choice(list(CHARS), int(n))) for n in lengths]
    return [rng.standard_normal((int(n), 8)).astype(np.float32) for n in lengths]


def _cpu_reference(path: Path, kind: InputKind, sequences: list[Any]) -> np.ndarray:
    """Encodings of each sequence alone, computed by the checkpoint on the CPU."""
    loaded = load(path, device="cpu")
    model = loaded.model
    assert isinstance(model, EncoderModel)
    rows = []
    with torch.inference_mode():
        for sequence in sequences:
            if kind == "text":
                assert loaded.input_tokenizer is not None
                ids = torch.tensor(loaded.input_tokenizer.encode(sequence), dtype=torch.int64)
            else:
                ids = torch.from_numpy(sequence)
            out = model(ids[None], torch.tensor([ids.shape[0]]))
            rows.append(out.encodings[0].numpy())
    return np.stack(rows)


@pytest.mark.parametrize("name", list(VARIANTS))
async def test_encoders_on_the_gpu_match_the_cpu(
    repository: Path, start_engine: StartEngine, name: str
) -> None:
    path = write_model(repository, name, **VARIANTS[name])
    engine = await start_engine(device="cuda")
    parameter = next(engine.registry.resolve(name).loaded.model.parameters())  # type: ignore[union-attr]
    assert parameter.device.type == "cuda"
    kind: InputKind = "text" if "text" in name else "features"
    sequences = _inputs(kind, 24, seed=len(name))
    expected = _cpu_reference(path, kind, sequences)
    # NOTE: concurrent callers, so the rows run in shared GPU batches of mixed lengths.
    results = await asyncio.gather(
        *(engine.encode(EncodeRequest(name, [s], kind)) for s in sequences)
    )
    together = await engine.encode(EncodeRequest(name, sequences, kind))
    got = np.stack([np.asarray(r.encodings)[0] for r in results])
    np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(np.asarray(together.encodings), expected, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
async def test_half_precision_on_the_gpu_stays_close_to_float32(
    repository: Path, start_engine: StartEngine, dtype: str
) -> None:
    path = write_model(repository, "lstm", cell="lstm", num_layers=2, pooling="mean", head=3)
    engine = await start_engine(device="cuda", dtype=dtype)
    parameter = next(engine.registry.resolve("lstm").loaded.model.parameters())  # type: ignore[union-attr]
    assert parameter.dtype == getattr(torch, dtype)
    sequences = _inputs("features", 16, seed=3)
    result = await engine.encode(EncodeRequest("lstm", sequences, "features"))
    encodings = np.asarray(result.encodings)
    assert encodings.dtype == np.float32  # the wire always gets float32
    np.testing.assert_allclose(
        encodings, _cpu_reference(path, "features", sequences), rtol=0, atol=3e-2
    )
    assert result.scores is not None and np.isfinite(result.scores).all()


async def test_demo_models_answer_on_the_gpu(tmp_path: Path, start_engine: StartEngine) -> None:
    repository = tmp_path / "demo"
    shutil.copytree(DEMO, repository)
    engine = await start_engine(repository=repository, device="cuda")
    dates = await engine.generate(
        GenerateRequest(
            "dates", ["25 December 2021", "8 de junio de 2004", "Montag, 2. Oktober 2023"], "text"
        )
    )
    assert [o.text for o in dates.outputs] == ["2021-12-25", "2004-06-08", "2023-10-02"]
    beam = await engine.generate(
        GenerateRequest("dates", ["8 de junio de 2004"], "text", beam_size=4)
    )
    assert beam.outputs[0].text == "2004-06-08"
    stream = engine.generate_stream(GenerateRequest("dates", ["25 December 2021"], "text"))
    events = [event async for event in stream]
    assert "".join(e.text or "" for e in events if isinstance(e, TokenEvent)) == "2021-12-25"
    assert isinstance(events[-1], GenerateResult)
    surnames = await engine.encode(EncodeRequest("surnames", ["Virtanen", "Dubois"], "text"))
    assert surnames.labels == ["Finnish", "French"]
    months = np.array(
        [22.7, 24.4, 25.5, 25.5, 25.8, 24.9, 24.1, 23.1, 22.0, 21.5, 21.6, 22.0,
         23.2, 24.7, 26.2, 26.5, 26.0, 24.8, 23.3, 21.1, 19.5, 19.3, 19.7, 20.4],
        dtype=np.float32,
    )[:, None]  # fmt: skip
    elnino = await engine.encode(EncodeRequest("elnino", [months], "features"))
    assert elnino.scores is not None
    assert elnino.scores[0][0] == pytest.approx(21.52, abs=0.05)


async def test_streamed_chunks_on_the_gpu_equal_the_whole_sequence(
    repository: Path, start_engine: StartEngine
) -> None:
    write_model(repository, "deep-gru", cell="gru", num_layers=2, pooling="mean", head=2)
    engine = await start_engine(device="cuda")
    sessions = engine.sessions
    sequence = _inputs("features", 1, seed=9)[0]
    sequence = np.concatenate([sequence, sequence, sequence])
    info = sessions.create("deep-gru", return_state=True)
    result = None
    for start in range(0, len(sequence), 7):
        result = await sessions.chunk(info.id, sequence[start : start + 7], "features")
    assert result is not None
    whole = await engine.encode(EncodeRequest("deep-gru", [sequence], "features"))
    np.testing.assert_allclose(
        result.encoding, np.asarray(whole.encodings)[0], rtol=1e-3, atol=1e-3
    )
    # The portable state token carries a GPU state through the host and back.
    assert result.state_token is not None
    resumed = sessions.create("deep-gru", state_token=result.state_token)
    assert resumed.steps == len(sequence)


def test_the_server_process_serves_the_demo_models_on_the_gpu(tmp_path: Path) -> None:
    repository = tmp_path / "demo"
    shutil.copytree(DEMO, repository)
    with running_server(repository, "--device", "cuda") as server:
        ready = [line for line in server.lines if line.get("event") == "server.ready"]
        assert "cuda" in str(ready[0].get("device"))
        answer = httpx.post(
            f"{server.url}/v1/models/dates/generate", json={"texts": ["25 December 2021"]}
        )
        assert answer.status_code == 200, answer.text
        assert answer.json()["outputs"][0]["text"] == "2021-12-25"


# bfloat16/float16 on the GPU against float32 on the CPU, every path (the CPU suite's
# tests/models/test_precision.py runs the same comparisons with bfloat16 on the CPU). The tolerance
# is the CPU's (2e-2, justified there) widened to the half-precision test's 3e-2 above for cuDNN's
# own kernel choices and TF32.
GPU_ATOL = 3e-2


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("name", list(PRECISION_ENCODERS))
def test_every_encoder_in_half_precision_on_the_gpu_stays_close_to_float32(
    tmp_path: Path, name: str, dtype: str
) -> None:
    path = write_model(tmp_path, name, seed=len(name), **PRECISION_ENCODERS[name])
    full = load(path)
    reduced = load(path, device="cuda", dtype=getattr(torch, dtype))
    assert all(p.describe()["dtype"] == dtype for p in reduced.plan.values())
    inputs, lengths = random_batch(full.config, 12, 70, seed=len(name))
    with torch.inference_mode():
        for pooling in ("last", "mean", "max", "none"):
            a = full.model(inputs, lengths, pooling)
            b = reduced.model(inputs.cuda(), lengths, pooling)
            assert b.encodings.dtype == torch.float32
            torch.testing.assert_close(b.encodings.cpu(), a.encodings, rtol=0, atol=GPU_ATOL)
            if a.scores is not None:
                assert b.scores is not None
                torch.testing.assert_close(b.scores.cpu(), a.scores, rtol=0, atol=GPU_ATOL)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("name", list(PRECISION_SEQ2SEQ))
def test_decoder_steps_in_half_precision_on_the_gpu_stay_close_to_float32(
    tmp_path: Path, name: str, dtype: str
) -> None:
    path = write_model(
        tmp_path, name, task="seq2seq", input_type="text", seed=len(name),
        **PRECISION_SEQ2SEQ[name],
    )  # fmt: skip
    full = load(path).model
    reduced = load(path, device="cuda", dtype=getattr(torch, dtype)).model
    inputs, lengths = random_batch(full.config, 6, 25, seed=len(name))
    with torch.inference_mode():
        state_a = full.encode(inputs, lengths)  # type: ignore[union-attr]
        state_b = reduced.encode(inputs.cuda(), lengths)  # type: ignore[union-attr]
        tokens = torch.full((6,), 1, dtype=torch.int64)
        for _ in range(12):
            a, state_a = full.step(state_a, tokens)  # type: ignore[union-attr]
            b, state_b = reduced.step(state_b, tokens.cuda())  # type: ignore[union-attr]
            torch.testing.assert_close(b.cpu(), a, rtol=0, atol=LOGPROB_ATOL + GPU_ATOL)
            tokens = a.argmax(dim=-1)


async def test_a_long_stream_in_bfloat16_on_the_gpu_equals_one_call(
    repository: Path, start_engine: StartEngine
) -> None:
    """1,000 steps in chunks through state tokens (float32 between chunks) against one call."""
    write_model(repository, "lstm", cell="lstm", hidden_size=64, num_layers=2, pooling="mean")
    engine = await start_engine(device="cuda", dtype="bfloat16")
    sequence = np.random.default_rng(1).standard_normal((1000, 8)).astype(np.float32)
    token: bytes | None = None
    last = None
    for start in range(0, 1000, 37):
        chunk = sequence[start : start + 37]
        last = await engine.sessions.stream("lstm", chunk, "features", state_token=token)
        token = last.state_token
    whole = await engine.encode(EncodeRequest("lstm", [sequence], "features"))
    assert last is not None and last.steps == 1000
    np.testing.assert_allclose(last.encoding, np.asarray(whole.encodings)[0], atol=GPU_ATOL)
