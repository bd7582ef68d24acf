"""Which dtype each part of a model computes in: reduced precision where it pays, float32 where not.

A model's parts are its `encoder` (embedding lookup stays float32; the recurrent layers),
`head` (encode models), and for seq2seq `decoder` (the recurrent step), `attention` and
`output` (the vocabulary projection). Each part casts what it reads to its own dtype; what
leaves a model (encodings, scores, final states, log-probabilities) is float32, so callers and
streaming state never see the reduced dtype.

On a GPU a requested float16/bfloat16 applies to every part (cuDNN is fast at both). On the CPU
only bfloat16 can pay, and only for some parts and shapes: PyTorch sends nn.LSTM to oneDNN
(AMX tiles), while GRU and Elman RNN run ATen's own step loop, where bfloat16 wins only for
large hidden sizes and batches. `plan_precision` applies the measured rules below
(`python -m bench.precision`, bench/RESULTS.md "bfloat16 on the CPU"); a part that wins only
for large batches keeps a float32 copy of its weights for small ones (`PartDtype.min_rows`).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from models.config import ModelConfig

DTypeName = Literal["float32", "bfloat16", "float16"]
Part = Literal["encoder", "head", "decoder", "attention", "output"]

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}

# CPU features that compute bfloat16 natively (torch.cpu.get_capabilities() names, from cpuinfo).
# x86-64: AVX512_BF16 (dot products; Intel since Cooper Lake, AMD since Zen 4) or AMX-BF16
# (tile matrix units; Intel Xeon since Sapphire Rapids). Arm: the Armv8.6-A BF16 extension
# (BFDOT/BFMMLA; Neoverse V1/N2, Graviton 3+) or SVE's.
X86_BF16_FEATURES = ("amx_bf16", "avx512_bf16")
ARM_BF16_FEATURES = ("bf16", "sve_bf16")


def cpu_bfloat16_missing(capabilities: Mapping[str, Any]) -> str | None:
    """None when a CPU with these capabilities (`torch.cpu.get_capabilities()`) computes
    bfloat16 natively; otherwise the missing feature, named for the refusal message."""
    architecture = str(capabilities.get("architecture", "unknown"))
    if architecture in ("x86_64", "x86", "AMD64", "i386", "i686"):
        features = X86_BF16_FEATURES
    elif architecture in ("aarch64", "arm64", "arm"):
        features = ARM_BF16_FEATURES
    else:
        return f"a native bfloat16 unit (architecture {architecture} is not one rnnserve knows)"
    if any(capabilities.get(name) for name in features):
        return None
    return f"{' or '.join(features)} (the {architecture} CPU reports neither)"


def check_cpu_dtype(dtype: str, capabilities: Mapping[str, Any]) -> None:
    """Raise ValueError unless a CPU with `capabilities` (`cpu_capabilities()`) can run `dtype`:
    float32 always, bfloat16 with native support, float16 never (no faster than float32)."""
    if dtype == "float16":
        raise ValueError(
            "dtype float16 needs a GPU: on the CPU it is no faster than float32 "
            "(use bfloat16 on a CPU that has it, or float32)"
        )
    if dtype == "bfloat16":
        missing = cpu_bfloat16_missing(capabilities)
        if missing is not None:
            raise ValueError(
                f"dtype bfloat16 on the CPU needs native bfloat16, and this CPU lacks {missing}; "
                "use float32 (or a GPU)"
            )


def cpu_capabilities() -> Mapping[str, Any]:
    """This machine's CPU features as PyTorch's cpuinfo reports them."""
    return torch.cpu.get_capabilities()


@dataclass(frozen=True)
class PartDtype:
    """A part's dtype: `reduced` in calls of at least `min_rows` rows, float32 in smaller ones."""

    reduced: torch.dtype = torch.float32
    min_rows: int = 1
    reason: str = "float32 requested"

    def dtype(self, rows: int) -> torch.dtype:
        """The dtype a call of `rows` rows computes in."""
        return self.reduced if rows >= self.min_rows else torch.float32

    @property
    def switches(self) -> bool:
        """Whether the part runs in both dtypes, by rows (it keeps a copy in each)."""
        return self.reduced != torch.float32 and self.min_rows > 1

    def describe(self) -> dict[str, Any]:
        """JSON-ready: `dtype`, and with a switch `from_rows` and `below` (float32); `reason`."""
        described: dict[str, Any] = {"dtype": dtype_name(self.reduced)}
        if self.switches:
            described["from_rows"] = self.min_rows
            described["below"] = "float32"
        described["reason"] = self.reason
        return described


Plan = dict[Part, PartDtype]


def model_parts(config: ModelConfig) -> list[Part]:
    """The parts a model of `config` has."""
    parts: list[Part] = ["encoder"]
    if config.head is not None:
        parts.append("head")
    if config.decoder is not None:
        parts.append("decoder")
        if config.decoder.attention == "additive":
            parts.append("attention")
        parts.append("output")
    return parts


def plan_precision(
    config: ModelConfig,
    dtype: torch.dtype,
    device_type: str,
    every_part: bool = False,
    capabilities: Mapping[str, Any] | None = None,
) -> Plan:
    """Each part's dtype for a model of `config` asked to run in `dtype` on `device_type`.

    `every_part` puts every part in `dtype` whatever the rules (accuracy checks, `rnnserve eval
    --every-part`). bfloat16 on a CPU without it (`capabilities`, default this machine's) falls
    back to float32 with the missing feature as the reason; the server refuses `--dtype bfloat16`
    on such a CPU at start-up, so this is reached by a model's own `serving.dtype`.
    """
    parts = model_parts(config)
    name = dtype_name(dtype)
    if dtype == torch.float32:
        return {part: PartDtype(reason="float32 requested") for part in parts}
    if device_type == "cpu" and dtype == torch.bfloat16:
        missing = cpu_bfloat16_missing(capabilities or cpu_capabilities())
        if missing is not None:
            why = f"bfloat16 requested, but the CPU lacks {missing}: float32 kept"
            return {part: PartDtype(reason=why) for part in parts}
    if every_part:
        return {part: PartDtype(dtype, 1, f"{name} on every part (asked)") for part in parts}
    if device_type != "cpu" or dtype not in (torch.bfloat16, torch.float16):
        return {part: PartDtype(dtype, 1, f"{name} requested on {device_type}") for part in parts}
    if dtype == torch.float16:
        why = "float16 is no faster than float32 on the CPU (0.3–1.1×): float32 kept"
        return {part: PartDtype(reason=why) for part in parts}
    return {part: _cpu_bfloat16(config, part) for part in parts}


def dtype_name(dtype: torch.dtype) -> str:
    """ "bfloat16" for torch.bfloat16 (any dtype: its name without "torch.")."""
    return str(dtype).removeprefix("torch.")


def uniform_dtype(plan: Plan) -> torch.dtype | None:
    """The one dtype every part of `plan` computes in at every batch size, if there is one."""
    dtypes = {part.reduced if part.min_rows <= 1 else None for part in plan.values()}
    if len(dtypes) != 1:
        return None
    return dtypes.pop()


# The rules for bfloat16 on the CPU, read off `python -m bench.precision`'s table (bench/
# RESULTS.md "bfloat16 on the CPU"). Per (part, cell, bidirectional): tiers (min size, min
# rows), largest size first: a part whose size reaches a tier's runs in bfloat16 in calls of
# at least its rows (below them in float32). Size = hidden for recurrent parts, weight elements
# (inputs × outputs) for the head and the output projection. No tier = bfloat16 was slower at
# every size and batch measured.
Tiers = tuple[tuple[int, int], ...]
CPU_BF16_RULES: dict[tuple[str, str, bool], Tiers] = {
    # oneDNN's fused LSTM (segmented): it pays from hidden 128, at every batch from 256.
    ("encoder", "lstm", False): ((256, 1), (128, 32)),
    # bidirectional runs packed (ATen's loop for unequal lengths): small batches lose.
    ("encoder", "lstm", True): ((512, 1), (256, 32), (128, 128)),
    # ATen's GRU / RNN loop: a win needs big matrices (wide and many rows).
    ("encoder", "gru", False): ((512, 8), (256, 32), (128, 128)),
    ("encoder", "gru", True): ((512, 8), (256, 32), (128, 128)),
    ("encoder", "gru-reset-before", False): ((512, 8), (256, 32)),
    ("encoder", "gru-reset-before", True): ((512, 8), (256, 32)),
    ("encoder", "rnn", False): ((512, 32), (256, 128)),
    ("encoder", "rnn", True): ((512, 32), (256, 64)),
    # One step of fused cells (torch.*_cell): again big matrices.
    ("decoder", "lstm", False): ((512, 8), (256, 32), (128, 128)),
    ("decoder", "gru", False): ((512, 8), (256, 32), (128, 128)),
    ("decoder", "gru-reset-before", False): ((512, 8), (256, 32)),
    ("decoder", "rnn", False): ((512, 8), (256, 64)),
    # Additive attention is elementwise work over [N, S, A] (tanh, softmax): it never pays.
    ("attention", "any", False): (),
    # A linear layer pays once its matrix is big (a vocabulary projection, not a small head).
    ("head", "any", False): ((500_000, 8), (100_000, 32)),
    ("output", "any", False): ((500_000, 8), (100_000, 32)),
}


def _cpu_bfloat16(config: ModelConfig, part: Part) -> PartDtype:
    enc = config.encoder
    cell = enc.cell if enc.cell != "gru" or enc.gru_reset_after else "gru-reset-before"
    if part == "encoder":
        key: tuple[str, str, bool] = (part, cell, enc.bidirectional)
        size, unit = enc.hidden_size, "hidden"
        what = f"{_cell_name(cell, enc.bidirectional)} encoder"
    elif part == "decoder":
        assert config.decoder is not None
        key, size, unit = (part, cell, False), config.decoder.hidden_size, "hidden"
        what = f"{_cell_name(cell, False)} decoder step"
    else:
        key, unit, what = (part, "any", False), "weights", part
        if part == "head":
            assert config.head is not None
            size = config.encoding_size * config.head.size
        elif part == "output":
            assert config.decoder is not None
            size = config.decoder.hidden_size * config.decoder.vocab_size
        else:
            size = 0
    tiers = CPU_BF16_RULES[key]
    if not tiers:
        return PartDtype(reason=f"{what}: bfloat16 was slower on the CPU in every shape measured")
    for min_size, min_rows in tiers:
        if size < min_size:
            continue
        where = "at every batch size" if min_rows <= 1 else f"from {min_rows} rows a call"
        why = f"{what}, {unit} {size}: bfloat16 is faster on the CPU {where}"
        largest = config.serving.max_batch_size
        if part in ("encoder", "head") and min_rows > largest:
            # NOTE: the decoder's rows are decode slots (a server setting), not batches.
            return PartDtype(reason=f"{why}, more than this model's batches ({largest})")
        return PartDtype(torch.bfloat16, min_rows, why)
    smallest = tiers[-1][0]
    return PartDtype(
        reason=f"{what}, {unit} {size}: bfloat16 is faster on the CPU only from {unit} {smallest}"
    )


def _cell_name(cell: str, bidirectional: bool) -> str:
    name = {"lstm": "LSTM", "gru": "GRU", "gru-reset-before": "GRU (reset before)", "rnn": "RNN"}
    return ("bidirectional " if bidirectional else "") + name[cell]


def describe(plan: Plan) -> dict[str, dict[str, Any]]:
    """A plan as JSON (model metadata: which dtype each part runs in, and why)."""
    return {part: dtype.describe() for part, dtype in plan.items()}


class Switch:
    """A part's module in the dtype(s) its `PartDtype` asks for.

    A fixed dtype casts the module in place. A part that switches by rows keeps the module in
    float32 (its checkpoint weights) and a reduced copy beside it, outside the module tree (not
    in `state_dict`, not moved by `.to`): so it is built after the model is placed.
    """

    def __init__(self, module: nn.Module, part: PartDtype) -> None:
        self.part = part
        self.module = module
        self.reduced: nn.Module | None = None
        if part.switches:
            self.reduced = copy.deepcopy(module).to(part.reduced)
        else:
            module.to(part.dtype(part.min_rows))

    def pick(self, rows: int) -> tuple[nn.Module, torch.dtype]:
        """The module and dtype for a call of `rows` rows."""
        dtype = self.part.dtype(rows)
        if self.reduced is not None and dtype != torch.float32:
            return self.reduced, dtype
        return self.module, dtype
