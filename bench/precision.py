"""The measurements behind `models.precision`'s CPU rules: each part of a model in float32 and in
bfloat16, by cell, hidden size and rows per call (bench/RESULTS.md "bfloat16 on the CPU").

    .venv/bin/python -m bench.precision                 # every part, the whole grid (~15 min)
    .venv/bin/python -m bench.precision --parts encoder --cells lstm --hidden 256 --rows 1 64
    .venv/bin/python -m bench.precision --quick         # a few shapes per part (a smoke run)

One intra-op thread (the server's default on 2 cores), timed in the thread's CPU time
(`time.thread_time`): on a host shared with other work, wall time counts the waits for a core,
CPU time only the work. Each shape runs float32 and bfloat16 in alternated rounds; a round takes
the best of a few calls; the ratio printed is the median over rounds of float32 time ÷ bfloat16
time (> 1: bfloat16 is faster). The encoder runs the real `SequenceEncoder` path (packed, or
segmented for an LSTM) over lengths drawn from [T/4, T] and returns final states, as a streaming
chunk does.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from models.attention import AdditiveAttention
from models.config import ModelConfig
from models.encoder import SequenceEncoder
from models.precision import PartDtype, cpu_bfloat16_missing, cpu_capabilities
from models.recurrent import make_rnn, step_rnn

CELLS = {
    "lstm": ("lstm", True),
    "gru": ("gru", True),
    "gru-reset-before": ("gru", False),
    "rnn": ("rnn", True),
}


def paired(
    first: Callable[[], object], second: Callable[[], object], rounds: int, repeats: int
) -> tuple[float, float, float]:
    """(first's seconds, second's seconds, median of per-round first ÷ second), alternated."""
    a_times: list[float] = []
    b_times: list[float] = []
    ratios: list[float] = []
    with torch.inference_mode():
        first()
        second()
        for _ in range(rounds):
            a = _best(first, repeats)
            b = _best(second, repeats)
            a_times.append(a)
            b_times.append(b)
            ratios.append(a / b)
    return statistics.median(a_times), statistics.median(b_times), statistics.median(ratios)


def _best(work: Callable[[], object], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.thread_time()
        work()
        best = min(best, time.thread_time() - start)
    return best


def _report(part: str, shape: str, result: tuple[float, float, float]) -> None:
    f32, bf16, ratio = result
    print(
        f"{part:9} {shape:44} float32 {f32 * 1e3:8.3f} ms  bfloat16 {bf16 * 1e3:8.3f} ms  "
        f"{ratio:5.2f}×",
        flush=True,
    )


def encoder(
    cell: str, bidirectional: bool, hidden: int, rows: int, steps: int, rounds: int
) -> tuple[float, float, float]:
    """The encoder part (recurrent layers, 1 layer, input 32): final states and outputs."""
    name, reset_after = CELLS[cell]
    config = ModelConfig.model_validate(
        {
            "format": "rnnserve/v1",
            "task": "encode",
            "input": {"type": "features", "size": 32},
            "encoder": {
                "cell": name,
                "hidden_size": hidden,
                "bidirectional": bidirectional,
                **({"reset_after": reset_after} if name == "gru" else {}),
            },
        }
    )
    generator = torch.Generator().manual_seed(rows * 1000 + hidden)
    full = SequenceEncoder(config.input, config.encoder).eval()
    reduced = copy.deepcopy(full)
    reduced.set_precision(PartDtype(torch.bfloat16, 1, "probe"))
    lengths = torch.randint(max(1, steps // 4), steps + 1, (rows,), generator=generator)
    lengths[0] = steps
    lengths = lengths.sort(descending=True).values  # as the batcher sends them
    x = torch.randn(rows, steps, 32, generator=generator)
    return paired(lambda: full(x, lengths), lambda: reduced(x, lengths), rounds, 2)


def decoder(cell: str, hidden: int, rows: int, rounds: int) -> tuple[float, float, float]:
    """The decoder part: 10 single steps (`step_rnn`) of a 1-layer cell, input 32 + hidden."""
    name, reset_after = CELLS[cell]
    rnn = make_rnn(name, 32 + hidden, hidden, 1, reset_after=reset_after).eval()  # type: ignore[arg-type]
    reduced = copy.deepcopy(rnn).to(torch.bfloat16)
    generator = torch.Generator().manual_seed(rows * 1000 + hidden)
    x = torch.randn(rows, 32 + hidden, generator=generator)
    h = torch.randn(1, rows, hidden, generator=generator)
    state = (h, h.clone()) if name == "lstm" else h
    reduced_state = (h.bfloat16(), h.bfloat16()) if name == "lstm" else h.bfloat16()
    xb = x.bfloat16()

    def steps(module: nn.Module, inputs: torch.Tensor, start: object) -> None:
        for _ in range(10):
            step_rnn(module, inputs, start)  # type: ignore[arg-type]

    return paired(
        lambda: steps(rnn, x, state), lambda: steps(reduced, xb, reduced_state), rounds, 3
    )


def attention(size: int, rows: int, rounds: int) -> tuple[float, float, float]:
    """Additive attention over 32 source steps: 10 queries, memory size = query size = `size`,
    attention size `size` / 2."""
    module = AdditiveAttention(size, size, size // 2).eval()
    reduced = copy.deepcopy(module).to(torch.bfloat16)
    generator = torch.Generator().manual_seed(rows * 1000 + size)
    query = torch.randn(rows, size, generator=generator)
    memory = torch.randn(rows, 32, size, generator=generator)
    mask = torch.ones(rows, 32, dtype=torch.bool)
    with torch.inference_mode():
        keys = module.project_keys(memory)
        reduced_memory = memory.bfloat16()
        reduced_keys = reduced.project_keys(reduced_memory)

    def ten(m: AdditiveAttention, k: torch.Tensor, v: torch.Tensor) -> None:
        for _ in range(10):
            m(query, k, v, mask)

    return paired(
        lambda: ten(module, keys, memory),
        lambda: ten(reduced, reduced_keys, reduced_memory),
        rounds,
        3,
    )


def linear(size: int, outputs: int, rows: int, rounds: int) -> tuple[float, float, float]:
    """A head or the decoder's output projection: 10 calls of Linear(size → outputs), the
    input cast to the part's dtype and the result back to float32, as the model does."""
    module = nn.Linear(size, outputs).eval()
    reduced = copy.deepcopy(module).to(torch.bfloat16)
    x = torch.randn(rows, size, generator=torch.Generator().manual_seed(rows))

    def ten(m: nn.Linear, dtype: torch.dtype) -> None:
        for _ in range(10):
            m(x.to(dtype)).float()

    return paired(
        lambda: ten(module, torch.float32), lambda: ten(reduced, torch.bfloat16), rounds, 3
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", default=["encoder", "decoder", "attention", "head"])
    parser.add_argument("--cells", nargs="+", default=list(CELLS), choices=list(CELLS))
    parser.add_argument("--hidden", nargs="+", type=int, default=[32, 64, 128, 256, 512])
    parser.add_argument("--rows", nargs="+", type=int, default=[1, 8, 32, 64, 128])
    parser.add_argument("--steps", type=int, default=64, help="encoder: longest length T")
    parser.add_argument("--rounds", type=int, default=3, help="alternated rounds per shape")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="two hidden sizes, two row counts")
    args = parser.parse_args()
    missing = cpu_bfloat16_missing(cpu_capabilities())
    if missing is not None:
        raise SystemExit(f"this CPU has no native bfloat16: it lacks {missing}")
    torch.set_num_threads(args.threads)
    if args.quick:
        args.hidden, args.rows, args.rounds = [64, 256], [1, 32], 1
    for part in args.parts:
        for hidden in args.hidden:
            for rows in args.rows:
                if part == "encoder":
                    for cell in args.cells:
                        for bidirectional in (False, True):
                            shape = (
                                f"{cell}{' bi' if bidirectional else ''} hidden {hidden} "
                                f"rows {rows} T≤{args.steps}"
                            )
                            result = encoder(
                                cell, bidirectional, hidden, rows, args.steps, args.rounds
                            )
                            _report(part, shape, result)
                elif part == "decoder":
                    for cell in args.cells:
                        shape = f"{cell} hidden {hidden} rows {rows} (10 steps)"
                        _report(part, shape, decoder(cell, hidden, rows, args.rounds))
                elif part == "attention":
                    shape = f"size {hidden} rows {rows} S=32 (10 steps)"
                    _report(part, shape, attention(hidden, rows, args.rounds))
                else:
                    for outputs in (16, 1000):
                        shape = f"{hidden} → {outputs} rows {rows} (10 calls)"
                        _report(part, shape, linear(hidden, outputs, rows, args.rounds))


if __name__ == "__main__":
    main()
