"""bfloat16 on the CPU: the per-part plan, and bfloat16 answers against float32 for every path.

Tolerance. bfloat16 keeps 8 significant bits: rounding a value v changes it by at most
2^-9·|v| ≈ 0.2 %. A recurrent step rounds its input, its weights and its new state, and oneDNN
and ATen accumulate the matrix products in float32, so one step adds an error of a few times
2^-9 on values that tanh/sigmoid keep within ±1. The step is a contraction for these models (the
recurrent Jacobian's norm is below 1: weights uniform in ±1/√H and gate slopes ≤ 1), so errors
from earlier steps shrink instead of adding up: the error settles at about (per-step error) /
(1 − contraction), measured at most 5.5e-3 (2.8 × 2^-9) on every cell here, and no larger
after 1,000 steps than after 100. ATOL = 2e-2 (10 × 2^-9, about 4× that) leaves room for other
seeds and shapes while catching any real mistake (a float32 model against one with other
weights differs by ~0.3). Log-probabilities add the log-softmax (error ≤ 2 × the logits'):
LOGPROB_ATOL = 5e-2.

The model-level tests force bfloat16 on every part with capabilities injected, so they run on
any CPU (PyTorch emulates bfloat16 where the CPU has no unit for it); the server-level tests
need a CPU the server accepts bfloat16 on and are skipped elsewhere.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bench.baseline import reference_config
from models import checkpoint
from models.checkpoint import LoadedModel, build_model
from models.config import ModelConfig
from models.encoder import EncoderModel
from models.precision import (
    PartDtype,
    Plan,
    cpu_bfloat16_missing,
    cpu_capabilities,
    plan_precision,
    uniform_dtype,
)
from models.recurrent import make_rnn, run_rnn, run_rnn_outputs, run_segmented
from models.seq2seq import DecoderState, Seq2SeqModel
from rnnserve_client.proto.inference import grpc_service_pb2 as v2
from rnnserve_client.proto.inference.grpc_service_pb2_grpc import GRPCInferenceServiceStub
from service.core.metrics import Metrics
from service.core.types import EncodeRequest, GenerateRequest
from tests.factories import CHAR_VOCAB, TARGET_VOCAB, make_config, write_model
from tests.support import (
    DEMO_REPOSITORY,
    LOGPROB_ATOL,
    PRECISION_ENCODERS,
    PRECISION_SEQ2SEQ,
    StartEngine,
    device_held,
    random_batch,
    running_server,
    sample,
)

DEMO = DEMO_REPOSITORY

ATOL = 2e-2
BF16_CPU = {"architecture": "x86_64", "avx512_bf16": True, "amx_bf16": True}
NO_BF16_CPU = {"architecture": "x86_64", "avx512_f": True, "avx512_bf16": False}
THIS_CPU_MISSING = cpu_bfloat16_missing(cpu_capabilities())
needs_bf16_cpu = pytest.mark.skipif(
    THIS_CPU_MISSING is not None, reason=f"this CPU lacks {THIS_CPU_MISSING}"
)


def _config(**kwargs: Any) -> ModelConfig:
    return make_config(**kwargs)


def _cpu_plan(config: ModelConfig) -> Plan:
    """The bfloat16 plan on a CPU that has it (whatever CPU runs the test)."""
    return plan_precision(config, torch.bfloat16, "cpu", capabilities=BF16_CPU)


# ------------------------------------------------------------------------------------ the plan


def test_the_reference_lstm_runs_its_encoder_in_bfloat16_at_every_batch_size() -> None:
    plan = _cpu_plan(_config(cell="lstm", hidden_size=256, num_layers=2, input_size=32))
    assert plan["encoder"] == PartDtype(torch.bfloat16, 1, plan["encoder"].reason)
    assert "every batch size" in plan["encoder"].reason
    assert plan["encoder"].describe()["dtype"] == "bfloat16"


@pytest.mark.parametrize(
    ("kwargs", "encoder", "from_rows"),
    [
        ({"cell": "lstm", "hidden_size": 64}, "float32", None),  # too small to pay
        ({"cell": "gru", "hidden_size": 512}, "bfloat16", 8),
        ({"cell": "gru", "hidden_size": 256, "bidirectional": True}, "bfloat16", 32),
        ({"cell": "gru", "hidden_size": 128}, "float32", None),  # from 128 rows; batches ≤ 64
        ({"cell": "rnn", "hidden_size": 512}, "bfloat16", 32),
        ({"cell": "gru", "reset_after": False, "hidden_size": 64}, "float32", None),
    ],
)
def test_recurrent_encoders_follow_the_measured_rules(
    kwargs: dict[str, Any], encoder: str, from_rows: int | None
) -> None:
    described = _cpu_plan(_config(**kwargs))["encoder"].describe()
    assert described["dtype"] == encoder
    assert described.get("from_rows") == from_rows
    if from_rows is not None:
        assert described["below"] == "float32"
    assert str(kwargs["hidden_size"]) in described["reason"]


def test_a_rule_above_the_models_batches_keeps_float32() -> None:
    big = _config(cell="gru", hidden_size=256, serving={"max_batch_size": 256})
    small = _config(cell="gru", hidden_size=256, serving={"max_batch_size": 16})
    assert _cpu_plan(big)["encoder"].switches
    part = _cpu_plan(small)["encoder"]
    assert part.reduced == torch.float32 and "batches (16)" in part.reason


def test_seq2seq_parts_attention_stays_float32() -> None:
    config = _config(task="seq2seq", cell="lstm", hidden_size=512, attention=True)
    plan = _cpu_plan(config)
    assert set(plan) == {"encoder", "decoder", "attention", "output"}
    assert plan["encoder"].reduced == torch.bfloat16 and not plan["encoder"].switches
    assert (plan["decoder"].reduced, plan["decoder"].min_rows) == (torch.bfloat16, 8)
    assert plan["attention"].reduced == torch.float32
    assert plan["output"].reduced == torch.float32  # 512 × 43 weights: too few to pay


def test_float16_on_the_cpu_and_anything_on_a_gpu() -> None:
    config = _config(cell="lstm", hidden_size=256, head=3)
    on_cpu = plan_precision(config, torch.float16, "cpu")
    assert all(p.reduced == torch.float32 for p in on_cpu.values())
    assert "no faster" in on_cpu["encoder"].reason
    on_gpu = plan_precision(config, torch.float16, "cuda")
    assert uniform_dtype(on_gpu) == torch.float16
    assert uniform_dtype(plan_precision(config, torch.float32, "cpu")) == torch.float32


def test_a_cpu_without_bfloat16_keeps_float32_and_says_what_it_lacks() -> None:
    config = _config(cell="lstm", hidden_size=256)
    plan = plan_precision(config, torch.bfloat16, "cpu", capabilities=NO_BF16_CPU)
    assert plan["encoder"].reduced == torch.float32
    assert "lacks amx_bf16 or avx512_bf16" in plan["encoder"].reason
    forced = plan_precision(
        config, torch.bfloat16, "cpu", capabilities=NO_BF16_CPU, every_part=True
    )
    assert forced["encoder"].reduced == torch.float32
    with_it = plan_precision(config, torch.bfloat16, "cpu", capabilities=BF16_CPU)
    assert with_it["encoder"].reduced == torch.bfloat16


# ------------------------------------------------------------------------ loading a checkpoint


def _load(path: Path, **kwargs: Any) -> LoadedModel:
    return checkpoint.load(path, dtype=torch.bfloat16, capabilities=BF16_CPU, **kwargs)


def test_serving_dtype_in_config_overrides_the_servers_default(tmp_path: Path) -> None:
    asks = write_model(
        tmp_path, "asks", cell="lstm", hidden_size=128, serving={"dtype": "bfloat16"}
    )
    refuses = write_model(
        tmp_path, "refuses", cell="lstm", hidden_size=128, serving={"dtype": "float32"}
    )
    plain = write_model(tmp_path, "plain", cell="lstm", hidden_size=128)
    assert checkpoint.read_config(asks / "config.json").serving.dtype == "bfloat16"
    assert checkpoint.load(asks, capabilities=BF16_CPU).plan["encoder"].reduced == torch.bfloat16
    assert _load(refuses).plan["encoder"].reduced == torch.float32
    assert _load(plain).plan["encoder"].reduced == torch.bfloat16
    assert checkpoint.load(plain).plan["encoder"].reduced == torch.float32


def test_a_switching_part_keeps_float32_weights_and_a_bfloat16_copy(tmp_path: Path) -> None:
    path = write_model(tmp_path, "m", cell="gru", hidden_size=16, head=["a", "b"])
    loaded = checkpoint.load(path)
    model = loaded.model
    assert isinstance(model, EncoderModel)
    model.set_precision(
        {"encoder": PartDtype(torch.bfloat16, 3, "test"), "head": PartDtype(reason="test")}
    )
    # The checkpoint's tensors are untouched: saving the model writes the same weights.
    assert all(t.dtype == torch.float32 for t in model.state_dict().values())
    reference = checkpoint.load(path).model
    x = torch.randn(4, 9, 8, generator=torch.Generator().manual_seed(0))
    lengths = torch.tensor([9, 7, 3, 1])
    with torch.inference_mode():
        small, small_ref = model(x[:2], lengths[:2]), reference(x[:2], lengths[:2])
        large, large_ref = model(x, lengths), reference(x, lengths)
    # Below 3 rows the float32 weights run: the same numbers exactly.
    torch.testing.assert_close(small.encodings, small_ref.encodings, rtol=0, atol=0)
    # From 3 rows the bfloat16 copy runs: close, not equal, and float32 on the way out.
    assert large.encodings.dtype == torch.float32 and large.scores is not None
    assert large.scores.dtype == torch.float32
    assert not torch.equal(large.encodings, large_ref.encodings)
    torch.testing.assert_close(large.encodings, large_ref.encodings, rtol=ATOL, atol=ATOL)


# ----------------------------------------------------- bfloat16 against float32, every path


@pytest.mark.parametrize("name", list(PRECISION_ENCODERS))
def test_encoders_in_bfloat16_stay_within_tolerance_of_float32(tmp_path: Path, name: str) -> None:
    path = write_model(tmp_path, name, seed=len(name), **PRECISION_ENCODERS[name])
    full = checkpoint.load(path)
    reduced = _load(path, every_part=True)
    assert all(part.reduced == torch.bfloat16 for part in reduced.plan.values())
    inputs, lengths = random_batch(full.config, 12, 70, seed=len(name))
    with torch.inference_mode():
        for pooling in ("last", "mean", "max", "none"):
            for return_state in (True, False):
                a = full.model(inputs, lengths, pooling, return_state=return_state)
                b = reduced.model(inputs, lengths, pooling, return_state=return_state)
                assert b.encodings.dtype == torch.float32
                torch.testing.assert_close(b.encodings, a.encodings, rtol=ATOL, atol=ATOL)
                if a.scores is not None:
                    assert b.scores is not None and b.scores.dtype == torch.float32
                    torch.testing.assert_close(b.scores, a.scores, rtol=ATOL, atol=ATOL)
                if return_state:
                    states = zip(_tensors(a.final_state), _tensors(b.final_state), strict=True)
                    for x, y in states:
                        assert y.dtype == torch.float32
                        torch.testing.assert_close(y, x, rtol=ATOL, atol=ATOL)


def _tensors(state: Any) -> tuple[torch.Tensor, ...]:
    return state if isinstance(state, tuple) else (state,)


@settings(max_examples=25, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 90), min_size=1, max_size=10),
    layers=st.integers(1, 2),
    initial=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_segmented_lstm_in_bfloat16_agrees_with_packing(
    lengths: list[int], layers: int, initial: bool, seed: int
) -> None:
    """The segmented path (bfloat16 segments, cut by the bfloat16 planner; states replayed)
    against packing, both in bfloat16, and the outputs-only path."""
    generator = torch.Generator().manual_seed(seed)
    rnn = make_rnn("lstm", 6, 24, layers).eval().to(torch.bfloat16)
    n = torch.tensor(lengths)
    x = torch.randn(len(lengths), max(lengths), 6, generator=generator).to(torch.bfloat16)
    state = None
    if initial:
        h = torch.randn(layers, len(lengths), 24, generator=generator).to(torch.bfloat16)
        state = (h, h.tanh())
    with torch.inference_mode():
        packed_out, packed_state = run_rnn(make_rnn_float(rnn), x.float(), n, _float(state))
        out, final = run_segmented(rnn, x, n, state)
        alone = run_rnn_outputs(rnn, x, n, state)
    torch.testing.assert_close(out.float(), packed_out, rtol=ATOL, atol=ATOL)
    torch.testing.assert_close(alone.float(), packed_out, rtol=ATOL, atol=ATOL)
    for a, b in zip(_tensors(final), _tensors(packed_state), strict=True):
        torch.testing.assert_close(a.float(), b, rtol=ATOL, atol=ATOL)


def make_rnn_float(rnn: torch.nn.Module) -> torch.nn.Module:
    """A float32 copy of `rnn` (same, bfloat16-rounded, weights)."""
    copy = make_rnn("lstm", rnn.input_size, rnn.hidden_size, rnn.num_layers).eval()  # type: ignore[arg-type]
    copy.load_state_dict({k: v.float() for k, v in rnn.state_dict().items()})
    return copy


def _float(state: Any) -> Any:
    return None if state is None else tuple(t.float() for t in state)


@pytest.mark.parametrize("name", list(PRECISION_SEQ2SEQ))
def test_decoder_steps_in_bfloat16_stay_within_tolerance_of_float32(
    tmp_path: Path, name: str
) -> None:
    """Teacher-forced along float32's greedy path: every step's log-probabilities."""
    path = write_model(
        tmp_path, name, task="seq2seq", input_type="text", seed=len(name), **PRECISION_SEQ2SEQ[name]
    )
    full, reduced = checkpoint.load(path).model, _load(path, every_part=True).model
    assert isinstance(full, Seq2SeqModel) and isinstance(reduced, Seq2SeqModel)
    inputs, lengths = random_batch(full.config, 6, 25, seed=len(name))
    with torch.inference_mode():
        state_a, state_b = full.encode(inputs, lengths), reduced.encode(inputs, lengths)
        tokens = torch.full((6,), 1, dtype=torch.int64)
        for _ in range(12):
            a, state_a = full.step(state_a, tokens)
            b, state_b = reduced.step(state_b, tokens)
            assert b.dtype == torch.float32
            torch.testing.assert_close(b, a, rtol=0, atol=LOGPROB_ATOL)
            tokens = a.argmax(dim=-1)
        for beam in (1, 3):
            outputs = reduced.generate(inputs, lengths, max_length=8, beam_size=beam)
            assert len(outputs) == 6 and all(len(o) <= 8 for o in outputs)


def test_a_switching_decoder_joins_rows_of_both_dtypes(tmp_path: Path) -> None:
    """Decoder rows in float32 (a small batch) and bfloat16 (a large one) join into one state,
    as the decode scheduler joins newcomers to a running batch."""
    path = write_model(tmp_path, "s", task="seq2seq", input_type="text", cell="lstm")
    full, model = checkpoint.load(path).model, checkpoint.load(path).model
    assert isinstance(full, Seq2SeqModel) and isinstance(model, Seq2SeqModel)
    switch = PartDtype(torch.bfloat16, 4, "test")
    fp32 = PartDtype(reason="test")
    model.set_precision({"encoder": fp32, "decoder": switch, "output": fp32})
    inputs, lengths = random_batch(model.config, 5, 10, seed=1)
    with torch.inference_mode():
        state = model.encode(inputs, lengths)
        bos = torch.full((5,), 1, dtype=torch.int64)
        _, large = model.step(state, bos)  # 5 rows: bfloat16
        _, small = model.step(state.select(torch.tensor([0, 1])), bos[:2])  # 2 rows: float32
        joined = DecoderState.cat([large, small])
        log_probs, _ = model.step(joined, torch.full((7,), 3, dtype=torch.int64))
        expected_state = DecoderState.cat(
            [full.step(full.encode(inputs, lengths), bos)[1]] * 2
        ).select(torch.tensor([0, 1, 2, 3, 4, 5, 6]))
        expected, _ = full.step(expected_state, torch.full((7,), 3, dtype=torch.int64))
    assert isinstance(large.hidden, tuple) and large.hidden[0].dtype == torch.bfloat16
    assert isinstance(small.hidden, tuple) and small.hidden[0].dtype == torch.float32
    torch.testing.assert_close(log_probs, expected, rtol=0, atol=LOGPROB_ATOL)


# ------------------------------------------------------------------------ 1,000-step streams


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_a_1000_step_stream_chunked_equals_whole_and_does_not_drift(
    tmp_path: Path, cell: str
) -> None:
    """Chunks of 37 steps, the state float32 between them (as sessions and state tokens keep
    it), against one 1,000-step call in bfloat16: within ATOL at every step; and against float32
    the error of the last 100 steps is no larger than the first 100's (no accumulation)."""
    path = write_model(tmp_path, cell, cell=cell, hidden_size=128, num_layers=2)
    full, reduced = checkpoint.load(path).model, _load(path, every_part=True).model
    assert isinstance(full, EncoderModel) and isinstance(reduced, EncoderModel)
    x = torch.randn(1, 1000, 8, generator=torch.Generator().manual_seed(7))
    one = torch.tensor([1000])
    with torch.inference_mode():
        whole = reduced(x, one, "none").encodings[0]
        reference = full(x, one, "none").encodings[0]
        state = None
        chunks = []
        for start in range(0, 1000, 37):
            chunk = x[:, start : start + 37]
            out = reduced(chunk, torch.tensor([chunk.shape[1]]), "none", state)
            state = out.final_state
            assert all(t.dtype == torch.float32 for t in _tensors(state))
            chunks.append(out.encodings[0])
    torch.testing.assert_close(torch.cat(chunks), whole, rtol=0, atol=ATOL)
    drift = (whole - reference).abs().amax(dim=1)
    assert float(drift.max()) < ATOL
    assert float(drift[-100:].max()) <= 2 * float(drift[:100].max()) + 1e-3


# --------------------------------------------------------------------------- through a server


@needs_bf16_cpu
async def test_the_server_says_which_dtype_each_part_runs_in(
    repository: Path, start_engine: StartEngine
) -> None:
    write_model(repository, "big", cell="lstm", hidden_size=256, num_layers=2, head=3)
    write_model(repository, "small", cell="gru", hidden_size=16, serving={"dtype": "float32"})
    path = write_model(
        repository, "opts-in", cell="lstm", hidden_size=128, serving={"dtype": "bfloat16"}
    )
    engine = await start_engine(dtype="bfloat16")
    big = engine.model_info("big").architecture["precision"]
    assert big["encoder"]["dtype"] == "bfloat16" and big["head"]["dtype"] == "float32"
    assert "reason" in big["head"]
    assert engine.model_info("small").architecture["precision"]["encoder"]["dtype"] == "float32"
    x = np.random.default_rng(0).standard_normal((30, 8)).astype(np.float32)
    result = await engine.encode(EncodeRequest("big", [x, x[:9]], "features", pooling="mean"))
    expected = checkpoint.load(repository / "big" / "1").model(
        torch.from_numpy(np.stack([x, np.pad(x[:9], ((0, 21), (0, 0)))])),
        torch.tensor([30, 9]),
        "mean",
    )
    encodings = np.asarray(result.encodings)
    assert encodings.dtype == np.float32
    np.testing.assert_allclose(encodings, expected.encodings.detach().numpy(), atol=ATOL)
    # A float32 server still runs the model that asks for bfloat16 in it.
    await engine.drain(1.0)
    engine = await start_engine()
    precision = engine.model_info("opts-in").architecture["precision"]
    assert precision["encoder"]["dtype"] == "bfloat16", path


@needs_bf16_cpu
async def test_a_long_stream_through_sessions_and_tokens_equals_one_call(
    repository: Path, start_engine: StartEngine
) -> None:
    """1,000 steps in chunks of 1–60 through a server-held session and through state tokens
    (float32 between chunks), against one encode of the whole sequence, in bfloat16."""
    write_model(repository, "lstm", cell="lstm", hidden_size=256, num_layers=2, pooling="mean")
    engine = await start_engine(dtype="bfloat16", state_key="a-test-key-of-enough-bytes")
    assert engine.model_info("lstm").architecture["precision"]["encoder"]["dtype"] == "bfloat16"
    sequence = np.random.default_rng(1).standard_normal((1000, 8)).astype(np.float32)
    rng = random.Random(2)
    cuts = [0]
    while cuts[-1] < 1000:
        cuts.append(min(1000, cuts[-1] + rng.randint(1, 60)))
    chunks = [sequence[a:b] for a, b in itertools.pairwise(cuts)]
    session = engine.sessions.create("lstm", pooling="none")
    steps = [await engine.sessions.chunk(session.id, c, "features") for c in chunks]
    token: bytes | None = None
    last = None
    for chunk in chunks:
        last = await engine.sessions.stream("lstm", chunk, "features", state_token=token)
        token = last.state_token
    whole = await engine.encode(EncodeRequest("lstm", [sequence], "features", pooling="none"))
    mean = await engine.encode(EncodeRequest("lstm", [sequence], "features"))
    np.testing.assert_allclose(
        np.concatenate([s.encoding for s in steps]), np.asarray(whole.encodings[0]), atol=ATOL
    )
    assert last is not None and last.steps == 1000
    np.testing.assert_allclose(last.encoding, np.asarray(mean.encodings)[0], atol=ATOL)


@needs_bf16_cpu
async def test_continuous_decoding_with_a_decoder_that_switches_dtype_by_rows(
    repository: Path, start_engine: StartEngine, metrics: Metrics
) -> None:
    """A decoder in bfloat16 from 8 rows: 12 callers' rows cross that line as they join and
    leave. Replaying each answer's tokens through the float32 model, every step where float32's
    choice wins by more than the bfloat16 error can move (2 × LOGPROB_ATOL) must have chosen the
    same token; most steps of these sources are such steps."""
    config = make_config(
        task="seq2seq", input_type="text", cell="lstm", hidden_size=512, attention=True
    )
    path = write_model(repository, "s2s", config=config)
    loaded = checkpoint.load(path)
    with torch.no_grad():  # sharper outputs: most choices win by a wide margin
        loaded.model.decoder.output.weight.mul_(40)  # type: ignore[union-attr]
    checkpoint.save(loaded.model, path, vocab=CHAR_VOCAB, target_vocab=TARGET_VOCAB)
    engine = await start_engine(dtype="bfloat16")
    precision = engine.model_info("s2s").architecture["precision"]
    assert precision["decoder"] == {**precision["decoder"], "dtype": "bfloat16", "from_rows": 8}
    rng = random.Random(3)
    texts = ["".join(rng.choice("abcdefgh ") for _ in range(rng.randint(2, 14))) for _ in range(16)]
    requests = [GenerateRequest("s2s", [t], "text", max_length=2 + i) for i, t in enumerate(texts)]
    # NOTE: queued behind a busy device, the 16 rows start decoding together, then leave.
    async with device_held(engine):
        pending = asyncio.gather(*(engine.generate(r) for r in requests))
        await asyncio.sleep(0.2)
    results = await pending
    clear = 0
    model = checkpoint.load(path).model
    assert isinstance(model, Seq2SeqModel)
    for text, result in zip(texts, results, strict=True):
        tokens = result.outputs[0].tokens
        ids = torch.tensor([[CHAR_VOCAB.index(c) for c in text]])
        with torch.inference_mode():
            state = model.encode(ids, torch.tensor([len(text)]))
            feed = torch.tensor([1])
            for token in tokens:
                log_probs, state = model.step(state, feed)
                top = torch.topk(log_probs[0], 2).values
                if float(top[0] - top[1]) > 2 * LOGPROB_ATOL:  # else a near tie: either is right
                    assert token == int(log_probs.argmax()), text
                    clear += 1
                feed = torch.tensor([token])  # NOTE: on along the served path
    assert clear >= sum(len(r.outputs[0].tokens) for r in results) // 2
    # Both dtypes ran: decode steps of more than 8 rows and of fewer.
    labels = {"model": "s2s", "version": "1", "kind": "decode"}
    below = sample(metrics, "rnnserve_batch_size_bucket", **labels, le="4.0")
    up_to_8 = sample(metrics, "rnnserve_batch_size_bucket", **labels, le="8.0")
    assert below > 0 and up_to_8 < sample(metrics, "rnnserve_batch_size_count", **labels)


# ------------------------------------------------------------------- `rnnserve serve` itself


def test_serve_with_bfloat16_on_the_cpu_serves_the_demos_or_names_what_the_cpu_lacks(
    tmp_path: Path,
) -> None:
    """`rnnserve serve --device cpu --dtype bfloat16`: on a CPU with native bfloat16 it serves
    every demo model and the reference model; on one without, it refuses at start-up."""
    if THIS_CPU_MISSING is not None:
        refused = subprocess.run(
            [
                sys.executable,
                "-m",
                "service.process.cli",
                "serve",
                "--device",
                "cpu",
                "--dtype",
                "bfloat16",
                "--repository",
                str(DEMO),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert refused.returncode == 2
        assert f"lacks {THIS_CPU_MISSING}" in refused.stdout + refused.stderr
        return
    repository = tmp_path / "repository"
    shutil.copytree(DEMO, repository)
    reference = build_model(reference_config())
    checkpoint.save(reference, repository / "reference" / "1")
    with running_server(repository, "--dtype", "bfloat16") as server:
        with httpx.Client(base_url=server.url, timeout=60) as http:
            surnames = http.post("/v1/models/surnames/encode", json={"texts": ["Virtanen"]})
            assert surnames.status_code == 200 and surnames.json()["labels"] == ["Finnish"]
            dates = http.post("/v1/models/dates/generate", json={"texts": ["25 December 2021"]})
            assert dates.json()["outputs"][0]["text"] == "2021-12-25"
            elnino = http.post("/v1/models/elnino/encode", json={"inputs": [[[22.7]] * 24]})
            assert elnino.status_code == 200
            x = np.random.default_rng(0).standard_normal((40, 32)).round(3).tolist()
            encoded = http.post("/v1/models/reference/encode", json={"inputs": [x]})
            assert encoded.status_code == 200
            info = http.get("/v1/models/reference").json()
            assert info["architecture"]["precision"]["encoder"]["dtype"] == "bfloat16"
            meta = http.get("/v2/models/reference").json()
            assert meta["parameters"] == {"precision.encoder": "bfloat16"}
        with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
            answer = GRPCInferenceServiceStub(channel).ModelMetadata(
                v2.ModelMetadataRequest(name="reference"), timeout=30
            )
            assert answer.parameters["precision.encoder"].string_param == "bfloat16"
    expected = reference(torch.tensor([x]), torch.tensor([40])).encodings.detach().numpy()
    np.testing.assert_allclose(encoded.json()["encodings"], expected, atol=ATOL)
