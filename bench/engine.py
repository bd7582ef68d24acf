"""Engine benchmark: batcher throughput and overhead vs direct model calls; continuous vs static
decoding. Every ratio is measured in the same run, on the same machine and thread settings.

    .venv/bin/python -m bench.engine [--threads N] [--rounds R] [--device cuda]
        [--dtype bfloat16 [--compare-only]]
    (as a module: bench/ holds files named like packages, e.g. http.py, models.py)

With `--dtype bfloat16` (or float16) a float32 engine runs beside the one in that dtype, and
the reference workload is measured on both in alternated rounds first: the model call alone
(batches of 64, the kernels' ratio), the engine with 64 callers, and 1-caller latency; the
other sections then run on the engine in `--dtype` (`--compare-only` stops after the
comparison).

Reference workload (issue 4): 2-layer LSTM, input 32, hidden 256; one sequence per caller,
lengths uniform 16–128; 64 concurrent callers. Direct and engine rounds alternate so that load
from other processes hits both. Seq2seq, two sizes with additive attention: "reference" (2-layer
LSTM, hidden 256, as the reference workload) and "demo" (1-layer GRU, hidden 128, as the bundled
dates model); 32 concurrent callers vs static batches of 32 that run until their longest member
ends; output lengths set per request by max_length (random weights rarely emit <eos>), two
mixes: "skewed" (3 in 4 short, 4–12 tokens; 1 in 4 long, 48–64) and "uniform" (4–64).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import string
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from prometheus_client import CollectorRegistry

from bench.baseline import packed_encode, reference_config
from models.checkpoint import build_model, save
from models.config import ModelConfig
from models.encoder import EncoderModel, collate
from models.seq2seq import Seq2SeqModel, greedy_decode
from service.core.engine import Engine
from service.core.metrics import Metrics
from service.core.settings import Settings
from service.core.types import EncodeRequest, GenerateRequest

CALLERS = 64
FEATURES = 32
VOCAB = ["<pad>", "<bos>", "<eos>", "<unk>", *string.ascii_lowercase]


def tiny_config() -> ModelConfig:
    return ModelConfig.model_validate(
        {
            "format": "rnnserve/v1",
            "task": "encode",
            "input": {"type": "features", "size": FEATURES},
            "encoder": {"cell": "lstm", "hidden_size": 16, "num_layers": 1},
        }
    )


# Seq2seq sizes: "reference" as the reference workload (2-layer LSTM, hidden 256);
# "demo" as the bundled dates model (1-layer GRU, hidden 128).
SEQ2SEQ_SIZES: dict[str, tuple[str, int, int, int]] = {
    "reference": ("lstm", 256, 2, 128),
    "demo": ("gru", 128, 1, 64),
}


def seq2seq_config(size: str) -> ModelConfig:
    cell, hidden, layers, attention = SEQ2SEQ_SIZES[size]
    return ModelConfig.model_validate(
        {
            "format": "rnnserve/v1",
            "task": "seq2seq",
            "input": {"type": "tokens", "vocab_size": len(VOCAB), "embedding_size": 32},
            "encoder": {"cell": cell, "hidden_size": hidden, "num_layers": layers},
            "decoder": {
                "hidden_size": hidden,
                "num_layers": layers,
                "embedding_size": 32,
                "vocab_size": len(VOCAB),
                "attention": "additive",
                "attention_size": attention,
                "bos_id": 1,
                "eos_id": 2,
                "max_length": 64,
            },
        }
    )


def write(repository: Path, name: str, config: ModelConfig) -> Path:
    torch.manual_seed(0)
    return save(build_model(config), repository / name / "1")


def median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1000


def _padded(model: torch.nn.Module, chunk: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """A padded batch on the model's device, and its lengths (CPU)."""
    inputs, lengths = collate(chunk)
    return inputs.to(next(model.parameters()).device), lengths


def direct_packed(model: EncoderModel, seqs: list[np.ndarray]) -> float:
    """Sequences per second of direct packed batch-64 model calls (FIFO order, no engine)."""
    start = time.perf_counter()
    for i in range(0, len(seqs), CALLERS):
        with torch.inference_mode():
            packed_encode(model, *_padded(model, seqs[i : i + CALLERS])).cpu()
    return len(seqs) / (time.perf_counter() - start)


def direct_forward(model: EncoderModel, seqs: list[np.ndarray], return_state: bool = True) -> float:
    """Sequences per second of direct batch-64 `model(...)` calls: the model's own length-aware
    path (segmented on the CPU) without the engine; `return_state=False` as the batcher calls
    it when no row wants its state."""
    start = time.perf_counter()
    for i in range(0, len(seqs), CALLERS):
        with torch.inference_mode():
            batch = _padded(model, seqs[i : i + CALLERS])
            model(*batch, return_state=return_state).encodings.cpu()
    return len(seqs) / (time.perf_counter() - start)


async def engine_closed_loop(engine: Engine, seqs: list[np.ndarray]) -> float:
    """Sequences per second of CALLERS concurrent callers, one sequence per request."""
    queue = list(reversed(seqs))

    async def caller() -> None:
        while queue:
            seq = queue.pop()
            await engine.encode(EncodeRequest("enc", [seq], "features"))

    start = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(CALLERS)))
    return len(seqs) / (time.perf_counter() - start)


async def one_caller(
    engine: Engine, model: EncoderModel, seq: np.ndarray, count: int, name: str = "enc"
) -> tuple[float, float]:
    """Median latency (ms) of one sequence alone: direct model call vs engine.encode, alternated
    `count` times on the same sequence."""
    direct, served = [], []
    for _ in range(count):
        start = time.perf_counter()
        with torch.inference_mode():
            model(*_padded(model, [seq])).encodings.cpu()
        direct.append(time.perf_counter() - start)
        start = time.perf_counter()
        await engine.encode(EncodeRequest(name, [seq], "features"))
        served.append(time.perf_counter() - start)
    return median_ms(direct), median_ms(served)


def static_decoding(model: Seq2SeqModel, sources: list[np.ndarray], limits: list[int]) -> float:
    """Useful tokens per second with static batches of 32 (each runs to its longest limit)."""
    tokens = 0
    start = time.perf_counter()
    for i in range(0, len(sources), 32):
        batch_limits = limits[i : i + 32]
        with torch.inference_mode():
            state = model.encode(*_padded(model, sources[i : i + 32]))
            outputs = greedy_decode(model, state, max(batch_limits))
        tokens += sum(min(len(o), limit) for o, limit in zip(outputs, batch_limits, strict=True))
    return tokens / (time.perf_counter() - start)


async def continuous_decoding(
    engine: Engine, sources: list[np.ndarray], limits: list[int], name: str
) -> float:
    """Useful tokens per second with 32 concurrent callers through the decode scheduler."""
    work = list(reversed(list(zip(sources, limits, strict=True))))
    produced = 0

    async def caller() -> None:
        nonlocal produced
        while work:
            source, limit = work.pop()
            result = await engine.generate(
                GenerateRequest(name, [source], "tokens", max_length=limit)
            )
            produced += len(result.outputs[0].tokens)

    start = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(32)))
    return produced / (time.perf_counter() - start)


async def compare_dtypes(
    engines: dict[str, Engine], seqs: list[np.ndarray], rounds: int, dtype: str
) -> None:
    """The reference workload on a float32 engine and one in `dtype`, alternated rounds."""
    models = {}
    for name, engine in engines.items():
        model = engine.registry.resolve("enc").loaded.model  # type: ignore[union-attr]
        assert isinstance(model, EncoderModel)
        models[name] = model
    plan = engines[dtype].model_info("enc").architecture["precision"]
    print(f"{dtype} plan of the reference model: {plan}")
    kernel: dict[str, list[float]] = {name: [] for name in engines}
    served: dict[str, list[float]] = {name: [] for name in engines}
    # NOTE: also per second of the process's CPU time: on a host shared with other work the
    # wall-clock rates include waits for a core, which pull both dtypes' rates together.
    served_cpu: dict[str, list[float]] = {name: [] for name in engines}
    for name in engines:  # warm-up: oneDNN builds its kernels for new shapes on first use
        direct_forward(models[name], seqs[: 2 * CALLERS], return_state=False)
        await engine_closed_loop(engines[name], seqs[: 2 * CALLERS])
    for round_ in range(rounds):
        order = list(engines) if round_ % 2 == 0 else list(reversed(engines))
        for name in order:
            kernel[name].append(direct_forward(models[name], seqs, return_state=False))
        for name in order:
            cpu = time.process_time()
            served[name].append(await engine_closed_loop(engines[name], seqs))
            served_cpu[name].append(len(seqs) / (time.process_time() - cpu))
    labels = (
        f"model call alone (batches of {CALLERS})",
        f"engine ({CALLERS} callers)",
        f"engine ({CALLERS} callers) per CPU-second",
    )
    for label, rates in zip(labels, (kernel, served, served_cpu), strict=True):
        base, other = statistics.median(rates["float32"]), statistics.median(rates[dtype])
        ratios = ", ".join(
            f"{b / a:.2f}" for a, b in zip(rates["float32"], rates[dtype], strict=True)
        )
        print(
            f"{label}: float32 {base:.0f} seq/s, {dtype} {other:.0f} seq/s, "
            f"{dtype}/float32 {other / base:.2f} (per round {ratios})"
        )
    for steps in (16, 72):
        seq = seqs[0][:1].repeat(steps, 0)
        latency: dict[str, list[float]] = {name: [] for name in engines}
        for _ in range(100):  # alternated: both see the same load
            for name, engine in engines.items():
                start = time.perf_counter()
                await engine.encode(EncodeRequest("enc", [seq], "features"))
                latency[name].append(time.perf_counter() - start)
        base, other = median_ms(latency["float32"]), median_ms(latency[dtype])
        print(
            f"1 caller, {steps} steps: float32 {base:.3f} ms, {dtype} {other:.3f} ms, "
            f"{dtype}/float32 latency {other / base:.2f} (medians of 100)"
        )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="intra-op threads (default: the server default, cores − 1)",
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N")
    parser.add_argument(
        "--requests", type=int, default=256, help="seq2seq requests per round (each mix)"
    )
    parser.add_argument("--sequences", type=int, default=512)
    parser.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        default="float32",
        help="the engine's --dtype; other than float32, compared with a float32 engine first",
    )
    parser.add_argument(
        "--compare-only", action="store_true", help="stop after the dtype comparison"
    )
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    seqs = [
        rng.standard_normal((int(n), FEATURES)).astype(np.float32)
        for n in rng.integers(16, 129, args.sequences)
    ]
    sources = [rng.integers(4, len(VOCAB), int(n)) for n in rng.integers(5, 30, args.requests)]
    mixes = {
        "skewed": [
            int(rng.integers(48, 65)) if rng.random() < 0.25 else int(rng.integers(4, 13))
            for _ in sources
        ],
        "uniform": [int(n) for n in rng.integers(4, 65, len(sources))],
    }

    with tempfile.TemporaryDirectory() as tmp:
        repository = Path(tmp)
        write(repository, "enc", reference_config())
        for size in SEQ2SEQ_SIZES:
            write(repository, f"s2s-{size}", seq2seq_config(size))
        write(repository, "tiny", tiny_config())
        engines: dict[str, Engine] = {}
        for dtype in dict.fromkeys(["float32", args.dtype]):
            settings = Settings(
                repository=repository, device=args.device, cpu_threads=args.threads, dtype=dtype
            )
            engines[dtype] = Engine(settings, Metrics(CollectorRegistry()))
            await engines[dtype].start()
        engine = engines[args.dtype]
        encoder = engine.registry.resolve("enc").loaded.model  # type: ignore[union-attr]
        assert isinstance(encoder, EncoderModel)
        print(
            f"cores {os.cpu_count()}, torch intra-op threads {torch.get_num_threads()}, "
            f"engine cpu_threads {engine.cpu_threads}, {args.sequences} sequences × "
            f"{args.rounds} rounds"
        )

        if args.dtype != "float32":
            await compare_dtypes(engines, seqs, args.rounds, args.dtype)
            if args.compare_only:
                for each in engines.values():
                    await each.drain(5.0)
                return
        direct_packed(encoder, seqs[:CALLERS])  # warm-up of the direct path
        direct_rates, engine_rates, forward_rates = [], [], []
        for _ in range(args.rounds):
            direct_rates.append(direct_packed(encoder, seqs))
            engine_rates.append(await engine_closed_loop(engine, seqs))
            forward_rates.append(direct_forward(encoder, seqs))
        direct_rate = statistics.median(direct_rates)
        engine_rate = statistics.median(engine_rates)
        forward_rate = statistics.median(forward_rates)
        print(
            f"model path (direct, batch 64): packed {direct_rate:.0f} seq/s, model forward "
            f"(length-aware) {forward_rate:.0f} seq/s, ratio {forward_rate / direct_rate:.2f}"
        )
        print(
            f"encode throughput: direct packed batch-64 {direct_rate:.0f} seq/s, engine "
            f"({CALLERS} callers) {engine_rate:.0f} seq/s, ratio {engine_rate / direct_rate:.2f}"
        )
        for steps in (16, 72):
            direct_ms, served_ms = await one_caller(
                engine, encoder, seqs[0][:1].repeat(steps, 0), 300
            )
            print(
                f"1 caller, {steps} steps: direct {direct_ms:.3f} ms, engine {served_ms:.3f} ms, "
                f"overhead {served_ms - direct_ms:.3f} ms (medians of 300)"
            )
        tiny = engine.registry.resolve("tiny").loaded.model  # type: ignore[union-attr]
        assert isinstance(tiny, EncoderModel)
        direct_ms, served_ms = await one_caller(engine, tiny, seqs[0][:8], 300, "tiny")
        print(
            f"1 caller, tiny model (LSTM hidden 16, 8 steps): direct {direct_ms:.3f} ms, engine "
            f"{served_ms:.3f} ms, overhead {served_ms - direct_ms:.3f} ms (medians of 300)"
        )
        for size in SEQ2SEQ_SIZES:
            name = f"s2s-{size}"
            seq2seq = engine.registry.resolve(name).loaded.model  # type: ignore[union-attr]
            assert isinstance(seq2seq, Seq2SeqModel)
            cell, hidden, layers, _ = SEQ2SEQ_SIZES[size]
            for mix, limits in mixes.items():
                static_rates, continuous_rates = [], []
                for _ in range(args.rounds):
                    static_rates.append(static_decoding(seq2seq, sources, limits))
                    continuous_rates.append(
                        await continuous_decoding(engine, sources, limits, name)
                    )
                static_rate = statistics.median(static_rates)
                continuous_rate = statistics.median(continuous_rates)
                print(
                    f"seq2seq {size} ({layers}-layer {cell.upper()} {hidden}), {mix} output "
                    f"lengths: static batches of 32 {static_rate:.0f} tok/s, continuous "
                    f"{continuous_rate:.0f} tok/s, ratio {continuous_rate / static_rate:.2f}"
                )
        for each in engines.values():
            await each.drain(5.0)


if __name__ == "__main__":
    # NOTE: the loop `rnnserve serve` runs (service/process/serve.py): uvloop where installed.
    try:
        import uvloop
    except ImportError:
        asyncio.run(main())
    else:
        uvloop.run(main())
