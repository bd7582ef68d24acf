"""Model-level throughput (run as a module: `python -m bench.models`; as a script, bench/models.py
would shadow the `models` package): 2-layer LSTM (input 32, hidden 256), lengths uniform in 16–128.

Reports sequences/s at batch 1, 8 and 64 (packed), padded vs packed at batch 64, and the
reset-before GRU (models.recurrent.ResetBeforeGRU) vs nn.GRU at the same sizes. Each figure is the
median over --repeats runs of the same fixed set of sequences, under torch.inference_mode().

    .venv/bin/python -m bench.models [--threads 1] [--repeats 5] [--sequences 128] [--device cpu]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence

from models.recurrent import make_rnn, run_rnn, run_segmented

INPUT, HIDDEN, LAYERS = 32, 256, 2


def _batches(lengths: list[int], batch: int, device: str) -> list[tuple[Tensor, Tensor]]:
    out = []
    for start in range(0, len(lengths), batch):
        lens = torch.tensor(lengths[start : start + batch])
        out.append((torch.randn(len(lens), int(lens.max()), INPUT, device=device), lens))
    return out


def _median_rate(
    work: Callable[[], None], sequences: int, repeats: int, device: str
) -> tuple[float, float]:
    """Median sequences/s over `repeats` runs (after one warm-up), and the median seconds."""
    work()
    times = []
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        work()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    return sequences / median, median


def main() -> None:
    """Run the benchmark and print one table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sequences", type=int, default=128, help="sequences per measurement")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    print(
        f"torch {torch.__version__}, device {args.device}, threads {torch.get_num_threads()}, "
        f"repeats {args.repeats}, {args.sequences} sequences, lengths uniform 16-128, "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
    )
    lengths = torch.randint(16, 129, (args.sequences,)).tolist()
    steps = sum(lengths)
    lstm = make_rnn("lstm", INPUT, HIDDEN, LAYERS).to(args.device).eval()
    rows: list[tuple[str, float, float]] = []

    def measure(label: str, module: nn.Module, batch: int, mode: str = "auto") -> float:
        """`mode`: auto (run_rnn's choice), packed, segmented, or padded (every row runs to
        the batch's longest length)."""
        batches = _batches(lengths, batch, args.device)

        def work() -> None:
            with torch.inference_mode():
                for inputs, lens in batches:
                    if mode == "packed":
                        packed_input = pack_padded_sequence(
                            inputs, lens, batch_first=True, enforce_sorted=False
                        )
                        module(packed_input)
                    elif mode == "segmented":
                        assert isinstance(module, nn.RNNBase)
                        run_segmented(module, inputs, lens)
                    elif mode == "padded":
                        run_rnn(module, inputs, torch.full_like(lens, inputs.shape[1]))
                    else:
                        run_rnn(module, inputs, lens)

        rate, seconds = _median_rate(work, len(lengths), args.repeats, args.device)
        rows.append((label, rate, seconds))
        return rate

    for batch in (1, 8, 64):
        measure(f"lstm packed, batch {batch}", lstm, batch, "packed")
    packed = rows[-1][1]
    segmented = measure("lstm segmented, batch 64", lstm, 64, "segmented")
    padded = measure("lstm padded, batch 64", lstm, 64, "padded")
    torch.manual_seed(args.seed)
    gru = make_rnn("gru", INPUT, HIDDEN, LAYERS, reset_after=True).to(args.device).eval()
    before = make_rnn("gru", INPUT, HIDDEN, LAYERS, reset_after=False).to(args.device).eval()
    fused = measure("nn.GRU (reset-after), batch 64", gru, 64)
    custom = measure("ResetBeforeGRU, batch 64", before, 64)

    print(f"{'case':36} {'seq/s':>10} {'median s':>10}")
    for label, rate, seconds in rows:
        print(f"{label:36} {rate:10.1f} {seconds:10.4f}")
    print(
        f"real steps per pass: {steps}; padded/packed step ratio at batch 64: "
        f"{_padded_steps(lengths, 64) / steps:.2f}"
    )
    print(f"packed / padded throughput (batch 64): {packed / padded:.2f}x")
    print(f"segmented / packed throughput (batch 64): {segmented / packed:.2f}x")
    print(f"ResetBeforeGRU / nn.GRU throughput (batch 64): {custom / fused:.2f}x")


def _padded_steps(lengths: list[int], batch: int) -> int:
    return sum(
        max(lengths[i : i + batch]) * len(lengths[i : i + batch])
        for i in range(0, len(lengths), batch)
    )


if __name__ == "__main__":
    main()
