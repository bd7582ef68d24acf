"""The fast recurrent layer: nn.RNN / nn.LSTM / nn.GRU run on packed sequences, plus the
reset-before GRU that PyTorch does not have.

Shapes: N = batch, T = time, F = input features, H = hidden, L = layers, D = directions.
`State = Tensor | tuple[Tensor, Tensor]` in PyTorch's layout `[L*D, N, H]` (LSTM: `(h, c)`).
Parameter names and gate order are PyTorch's (`weight_ih_l{k}[_reverse]`; LSTM i,f,g,o; GRU
r,z,n) so vanilla state_dicts load without conversion.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

State = Tensor | tuple[Tensor, Tensor]
Cell = Literal["rnn", "lstm", "gru"]

GATES: dict[str, int] = {"rnn": 1, "lstm": 4, "gru": 3}


class ResetBeforeGRU(nn.Module):
    """GRU with the reset gate applied before the recurrent product (Keras `reset_after=False`).

    r = σ(W_ir x + b_ir + W_hr h + b_hr);  z = σ(W_iz x + b_iz + W_hz h + b_hz)
    n = tanh(W_in x + b_in + W_hn (r ⊙ h) + b_hn);  h' = (1 − z) ⊙ n + z ⊙ h
    Same parameter names and shapes as nn.GRU (gate order r, z, n). The input projections of all
    steps are one matrix product; only the recurrent products run per step.
    """

    def __init__(
        self, input_size: int, hidden_size: int, num_layers: int = 1, bidirectional: bool = False
    ) -> None:
        super().__init__()
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.bidirectional = bidirectional
        directions = 2 if bidirectional else 1
        for layer in range(num_layers):
            layer_input = input_size if layer == 0 else hidden_size * directions
            for suffix in _suffixes(bidirectional):
                name = f"l{layer}{suffix}"
                self.register_parameter(
                    f"weight_ih_{name}", nn.Parameter(torch.empty(3 * hidden_size, layer_input))
                )
                self.register_parameter(
                    f"weight_hh_{name}", nn.Parameter(torch.empty(3 * hidden_size, hidden_size))
                )
                self.register_parameter(
                    f"bias_ih_{name}", nn.Parameter(torch.empty(3 * hidden_size))
                )
                self.register_parameter(
                    f"bias_hh_{name}", nn.Parameter(torch.empty(3 * hidden_size))
                )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Uniform(−1/√H, 1/√H), as nn.GRU."""
        bound = 1.0 / math.sqrt(self.hidden_size)
        for weight in self.parameters():
            nn.init.uniform_(weight, -bound, bound)

    def forward(
        self, inputs: Tensor, lengths: Tensor, initial_state: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """inputs [N, T, F], lengths [N] → (outputs [N, T, D*H], final h [L*D, N, H])."""
        batch, steps, _ = inputs.shape
        directions = 2 if self.bidirectional else 1
        if initial_state is None:
            initial_state = inputs.new_zeros(self.num_layers * directions, batch, self.hidden_size)
        lengths = lengths.to(inputs.device)
        time = torch.arange(steps, device=inputs.device)
        # mask [N, T, 1]: which steps are real for each row
        mask = (time[None, :] < lengths[:, None]).unsqueeze(-1).to(inputs.dtype)
        # Index that reverses each row within its own length (padding stays in place).
        reverse = torch.where(
            time[None, :] < lengths[:, None], lengths[:, None] - 1 - time[None, :], time[None, :]
        )
        finals: list[Tensor] = []
        layer_input = inputs
        for layer in range(self.num_layers):
            outputs: list[Tensor] = []
            for direction, suffix in enumerate(_suffixes(self.bidirectional)):
                name = f"l{layer}{suffix}"
                x = layer_input
                if direction == 1:
                    x = _gather_time(x, reverse)
                out, h = self._run(x, mask, initial_state[layer * directions + direction], name)
                if direction == 1:
                    out = _gather_time(out, reverse)
                outputs.append(out)
                finals.append(h)
            layer_input = torch.cat(outputs, dim=-1) if directions == 2 else outputs[0]
        return layer_input * mask, torch.stack(finals)

    def _run(self, x: Tensor, mask: Tensor, h: Tensor, name: str) -> tuple[Tensor, Tensor]:
        H = self.hidden_size
        w_ih: Tensor = getattr(self, f"weight_ih_{name}")
        w_hh: Tensor = getattr(self, f"weight_hh_{name}")
        b_ih: Tensor = getattr(self, f"bias_ih_{name}")
        b_hh: Tensor = getattr(self, f"bias_hh_{name}")
        projected = torch.addmm(b_ih, x.reshape(-1, x.shape[-1]), w_ih.t())
        projected = projected.view(x.shape[0], x.shape[1], 3 * H)  # [N, T, 3H]
        w_rz, w_n = w_hh[: 2 * H].t(), w_hh[2 * H :].t()
        b_rz, b_n = b_hh[: 2 * H], b_hh[2 * H :]
        steps: list[Tensor] = []
        for t in range(x.shape[1]):
            gi = projected[:, t]
            rz = torch.sigmoid(gi[:, : 2 * H] + torch.addmm(b_rz, h, w_rz))
            r, z = rz[:, :H], rz[:, H:]
            n = torch.tanh(gi[:, 2 * H :] + torch.addmm(b_n, r * h, w_n))
            new_h = (1 - z) * n + z * h
            keep = mask[:, t]  # NOTE: rows past their length keep their last real state
            h = keep * new_h + (1 - keep) * h
            steps.append(h)
        return torch.stack(steps, dim=1), h


def _suffixes(bidirectional: bool) -> list[str]:
    return ["", "_reverse"] if bidirectional else [""]


def _gather_time(x: Tensor, index: Tensor) -> Tensor:
    return torch.gather(x, 1, index[:, :, None].expand(-1, -1, x.shape[-1]))


def make_rnn(
    cell: Cell,
    input_size: int,
    hidden_size: int,
    num_layers: int = 1,
    bidirectional: bool = False,
    nonlinearity: Literal["tanh", "relu"] = "tanh",
    reset_after: bool = True,
) -> nn.Module:
    """Build the recurrent module for a cell: nn.RNN/LSTM/GRU (batch_first) or ResetBeforeGRU."""
    if cell == "rnn":
        return nn.RNN(
            input_size,
            hidden_size,
            num_layers,
            nonlinearity=nonlinearity,
            batch_first=True,
            bidirectional=bidirectional,
        )
    if cell == "lstm":
        return nn.LSTM(
            input_size, hidden_size, num_layers, batch_first=True, bidirectional=bidirectional
        )
    if reset_after:
        return nn.GRU(
            input_size, hidden_size, num_layers, batch_first=True, bidirectional=bidirectional
        )
    return ResetBeforeGRU(input_size, hidden_size, num_layers, bidirectional)


# Where the segmented path beats packing on the CPU, from `python -m bench.probes segments
# [--dtype bfloat16]` (figures in bench/RESULTS.md): nn.LSTM only (the fused oneDNN kernel is
# LSTM's; a GRU stays packed). In float32 the segments must be long and wide enough to pay for
# replaying the rows that end inside one, less so for outputs alone (no replays). In bfloat16
# the packed path's step loop is slower than float32's while the fused kernel is faster, so
# segments win at every size.
SEGMENTED_MIN_HIDDEN = {  # by dtype, then by whether final states are wanted
    torch.float32: {True: 128, False: 64},
    torch.bfloat16: {True: 1, False: 1},
}
SEGMENTED_MIN_STEPS = {
    torch.float32: {True: 64, False: 8},
    torch.bfloat16: {True: 2, False: 2},
}


@dataclass(frozen=True)
class PlanCosts:
    """The cost model of `plan_segments`, in row-steps (one row through one step of a plain
    call). oneDNN reorders every weight on each call (`call`) and reads the recurrent weights
    once per step whatever the rows (`step`); a row that ends inside a segment and whose final
    state is wanted is finished by the packed path (`finish` per step)."""

    call: float
    step: float
    finish: float


# Call and step fitted on the reference LSTM (`python -m bench.probes call-costs [--dtype
# bfloat16]`), the replay and bfloat16's call chosen by sweeps (`python -m bench.probes
# plan-sweep`); figures in bench/RESULTS.md. Both sides grow with the weights, so the ratios
# carry across sizes.
PLAN_COSTS = {
    torch.float32: PlanCosts(call=48.0, step=0.6, finish=3.0),
    torch.bfloat16: PlanCosts(call=120.0, step=1.6, finish=5.5),
}
# The plan considers at most this many cut points (its cost grows with their square, in Python).
PLAN_MAX_POINTS = 24


def run_rnn(
    rnn: nn.Module, inputs: Tensor, lengths: Tensor, initial_state: State | None = None
) -> tuple[Tensor, State]:
    """Run `rnn` over a padded batch: inputs [N, T, F], lengths [N] (CPU int64, each ≥ 1).

    Returns (outputs [N, T, D*H], zero past each length; final state [L*D, N, H] taken at each
    row's own last step). Padding never changes a result: unequal lengths run packed, or, for a
    long batch on a unidirectional nn.LSTM on the CPU, segmented (`run_segmented`).
    """
    if isinstance(rnn, ResetBeforeGRU):
        assert initial_state is None or isinstance(initial_state, Tensor)
        return rnn(inputs, lengths, initial_state)
    steps = inputs.shape[1]
    if lengths.device.type != "cpu":
        lengths = lengths.cpu()
    if int(lengths.min()) == steps:
        # NOTE: every row is full length, so packing would change nothing; skip its cost.
        outputs, state = rnn(inputs, initial_state)
        return outputs, state
    if _segments_win(rnn, inputs, need_state=True):
        assert isinstance(rnn, nn.RNNBase)
        return run_segmented(rnn, inputs, lengths, initial_state)
    packed = pack_padded_sequence(inputs, lengths, batch_first=True, enforce_sorted=False)
    packed_out, state = rnn(packed, initial_state)
    outputs, _ = pad_packed_sequence(packed_out, batch_first=True, total_length=steps)
    return outputs, state


def run_rnn_outputs(
    rnn: nn.Module, inputs: Tensor, lengths: Tensor, initial_state: State | None = None
) -> Tensor:
    """`run_rnn`'s outputs alone: the segmented path then skips finishing the final states of
    rows that end inside a segment, and plans fewer, longer segments."""
    # NOTE: the gate first: it is plain Python, while `lengths.min()` is a torch call that gives
    # up the GIL (and `run_rnn` makes it again).
    if _segments_win(rnn, inputs, need_state=False):
        assert isinstance(rnn, nn.RNNBase)
        if lengths.device.type != "cpu":
            lengths = lengths.cpu()
        if int(lengths.min()) < inputs.shape[1]:
            return _segmented(rnn, inputs, lengths, initial_state, None, need_state=False)[0]
    return run_rnn(rnn, inputs, lengths, initial_state)[0]


def _segments_win(rnn: nn.Module, inputs: Tensor, need_state: bool) -> bool:
    if not isinstance(rnn, nn.LSTM) or rnn.bidirectional or inputs.device.type != "cpu":
        return False
    dtype = inputs.dtype if inputs.dtype in SEGMENTED_MIN_HIDDEN else torch.float32
    return (
        rnn.hidden_size >= SEGMENTED_MIN_HIDDEN[dtype][need_state]
        and inputs.shape[1] >= SEGMENTED_MIN_STEPS[dtype][need_state]
    )


def plan_segments(
    ends: list[int], need_state: bool = True, costs: PlanCosts = PLAN_COSTS[torch.float32]
) -> list[int]:
    """Where `run_segmented` cuts time for rows of lengths `ends` (descending, each ≥ 1): each
    segment's end, ascending, the last the longest length. The cheapest split under the cost
    model `costs`, cutting only where rows end (a row ending on a cut needs no finishing)."""
    ascending = ends[::-1]
    points = sorted(set(ascending))
    if len(points) > PLAN_MAX_POINTS:
        count = len(points)
        points = sorted(
            {points[(i * count) // PLAN_MAX_POINTS - 1] for i in range(1, PLAN_MAX_POINTS + 1)}
        )
    cuts = [0, *points]
    rows = len(ascending)
    prefix = [0]
    for n in ascending:
        prefix.append(prefix[-1] + n)
    ended = [bisect.bisect_right(ascending, t) for t in cuts]  # rows of length ≤ t
    short = [bisect.bisect_left(ascending, t) for t in cuts]  # rows of length < t
    best = [0.0] + [math.inf] * (len(cuts) - 1)
    previous = [0] * len(cuts)
    for j in range(1, len(cuts)):
        stop, inside_end = cuts[j], short[j]
        for i in range(j):
            start, first = cuts[i], ended[i]
            cost = best[i] + costs.call + (stop - start) * (costs.step + rows - first)
            if need_state and inside_end > first:
                # NOTE: rows ending strictly inside (start, stop) replay their last segment.
                replay = prefix[inside_end] - prefix[first] - (inside_end - first) * start
                cost += costs.finish * replay
            if cost < best[j]:
                best[j], previous[j] = cost, i
    plan: list[int] = []
    j = len(cuts) - 1
    while j:
        plan.append(cuts[j])
        j = previous[j]
    return plan[::-1]


def run_segmented(
    rnn: nn.RNNBase,
    inputs: Tensor,
    lengths: Tensor,
    initial_state: State | None = None,
    cuts: list[int] | None = None,
) -> tuple[Tensor, State]:
    """`run_rnn` for a unidirectional nn.RNN/LSTM/GRU, by time segments ending at `cuts`
    (ascending, the last ≥ the longest length; default: `plan_segments`).

    Rows sorted longest first; each segment is one plain (unpacked) call over the rows still
    running, from their state at the segment's start. On the CPU a plain call runs a fused
    kernel that is several times faster per step than the packed path's step-by-step loop, so
    this beats packing even though rows that end inside a segment compute extra steps. Those
    rows' exact final states come from one short packed call from their segment-start state.
    Same results as the packed path (to float rounding).
    """
    outputs, state = _segmented(rnn, inputs, lengths, initial_state, cuts, need_state=True)
    assert state is not None
    return outputs, state


def _segmented(
    rnn: nn.RNNBase,
    inputs: Tensor,
    lengths: Tensor,
    initial_state: State | None,
    cuts: list[int] | None,
    need_state: bool,
) -> tuple[Tensor, State | None]:
    batch, steps, _ = inputs.shape
    order = torch.argsort(lengths, descending=True, stable=True)
    # NOTE: the batcher already sorts longest first; then no row is moved (no copies).
    in_order = bool((order == torch.arange(batch)).all())
    sorted_lengths = lengths[order]
    x = inputs if in_order else inputs.index_select(0, order.to(inputs.device))
    if initial_state is None:
        zero = x.new_zeros(rnn.num_layers, batch, rnn.hidden_size)
        state: State = (zero, zero.clone()) if isinstance(rnn, nn.LSTM) else zero
    else:
        state = initial_state if in_order else select_state(initial_state, order.to(x.device))
    # NOTE: the bookkeeping runs on Python lists, not tensors: every torch call gives up the
    # GIL and must win it back, which a busy event loop beside this thread makes slow.
    ends = sorted_lengths.tolist()  # descending
    if ends[0] > steps:
        raise ValueError(f"a length of {ends[0]} exceeds the {steps} steps of the inputs")
    if cuts is None:
        cuts = plan_segments(ends, need_state, PLAN_COSTS.get(x.dtype, PLAN_COSTS[torch.float32]))
    elif not cuts or cuts[-1] < ends[0]:
        raise ValueError(f"the last cut must reach the longest length {ends[0]}, got {cuts}")
    # NOTE: every step is written by a segment or zeroed by the final mask.
    outputs = x.new_empty(batch, steps, rnn.hidden_size)
    final = _empty_like_state(state) if need_state else None
    start_states = _empty_like_state(state) if need_state else None
    inside: list[int] = []  # rows that end inside a segment (their final state is replayed)
    inside_starts: list[int] = []  # … and where that segment starts
    running = batch
    t0 = 0
    for t1 in cuts:
        if running == 0:
            break
        part = _narrow_state(state, running)
        out, state = rnn(x[:running, t0:t1], part)
        outputs[:running, t0:t1].copy_(out)
        # Rows ending in (t0, t1] sit at [still, running), longest first: those ending exactly
        # at t1 have their final state now; the others keep their segment-start state.
        still = bisect.bisect_left(ends, -t1, key=lambda n: -n)
        if final is not None and start_states is not None:
            exact = bisect.bisect_left(ends, -(t1 - 1), key=lambda n: -n)
            _copy_rows(final, state, still, exact)
            _copy_rows(start_states, part, exact, running)
            inside += range(exact, running)
            inside_starts += [t0] * (running - exact)
        running = still
        t0 = t1
    if final is not None and start_states is not None and inside:
        _replay(rnn, x, sorted_lengths, inside, inside_starts, start_states, final)
    real = torch.arange(steps)[None, :] < sorted_lengths[:, None]  # [N, T]
    outputs.masked_fill_(~real[:, :, None].to(x.device), 0.0)
    if in_order:
        return outputs, final
    inverse = torch.argsort(order).to(x.device)
    outputs = outputs.index_select(0, inverse)
    return outputs, None if final is None else select_state(final, inverse)


def _replay(
    rnn: nn.RNNBase,
    x: Tensor,
    lengths: Tensor,
    rows: list[int],
    starts: list[int],
    start_states: State,
    final: State,
) -> None:
    """Write into `final` the exact final states of `rows` (which end inside the segment that
    starts at `starts`): one short packed call replays each one's last segment from its start
    state. x [N, T, F] and lengths [N] are in the segmented order."""
    row_index = torch.tensor(rows)
    start_index = torch.tensor(starts)
    remaining = lengths[row_index] - start_index  # 1 … its segment's length − 1
    index = start_index[:, None] + torch.arange(int(remaining.max()))[None, :]
    index = index.clamp(max=x.shape[1] - 1).to(x.device)
    device_rows = row_index.to(x.device)
    tail = x[device_rows[:, None], index]  # [R, longest remainder, F]
    packed = pack_padded_sequence(tail, remaining, batch_first=True, enforce_sorted=False)
    _, fixed = rnn(packed, select_state(start_states, device_rows))
    _scatter_rows(final, fixed, device_rows)


def _empty_like_state(state: State) -> State:
    if isinstance(state, tuple):
        return (torch.empty_like(state[0]), torch.empty_like(state[1]))
    return torch.empty_like(state)


def _narrow_state(state: State, rows: int) -> State:
    # NOTE: cuDNN/oneDNN want contiguous initial states; a prefix of the batch is not.
    if (state[0] if isinstance(state, tuple) else state).shape[1] == rows:
        return state
    if isinstance(state, tuple):
        return (state[0][:, :rows].contiguous(), state[1][:, :rows].contiguous())
    return state[:, :rows].contiguous()


def _copy_rows(target: State, source: State, first: int, last: int) -> None:
    if first == last:
        return
    if isinstance(target, tuple):
        assert isinstance(source, tuple)
        target[0][:, first:last] = source[0][:, first:last]
        target[1][:, first:last] = source[1][:, first:last]
    else:
        assert isinstance(source, Tensor)
        target[:, first:last] = source[:, first:last]


def _scatter_rows(target: State, source: State, rows: Tensor) -> None:
    if isinstance(target, tuple):
        assert isinstance(source, tuple)
        target[0][:, rows] = source[0]
        target[1][:, rows] = source[1]
    else:
        assert isinstance(source, Tensor)
        target[:, rows] = source


def step_rnn(rnn: nn.Module, inputs: Tensor, state: State) -> tuple[Tensor, State]:
    """One time step for every row: inputs [N, F], state [L, N, H] → (top output [N, H], state).

    Unidirectional only (decoders). nn.RNN/LSTM/GRU run one fused cell op per layer
    (torch.*_cell): a single step through nn.GRU/LSTM.forward costs more in argument checks
    and flat-weight handling. Same results as `run_rnn` over one step.
    """
    if isinstance(rnn, ResetBeforeGRU) or not isinstance(rnn, nn.RNNBase) or rnn.bidirectional:
        ones = torch.ones(inputs.shape[0], dtype=torch.int64)
        outputs, new_state = run_rnn(rnn, inputs[:, None, :], ones, state)
        return outputs[:, 0], new_state
    x = inputs
    if isinstance(rnn, nn.LSTM):
        assert isinstance(state, tuple)
        hs, cs = [], []
        for layer in range(rnn.num_layers):
            h, c = torch.lstm_cell(
                x, (state[0][layer], state[1][layer]), *_cell_weights(rnn, layer)
            )
            hs.append(h)
            cs.append(c)
            x = h
        return x, (torch.stack(hs), torch.stack(cs))
    assert isinstance(state, Tensor)
    if isinstance(rnn, nn.GRU):
        cell = torch.gru_cell
    elif rnn.nonlinearity == "tanh":
        cell = torch.rnn_tanh_cell
    else:
        cell = torch.rnn_relu_cell
    hs = []
    for layer in range(rnn.num_layers):
        x = cell(x, state[layer], *_cell_weights(rnn, layer))
        hs.append(x)
    return x, torch.stack(hs)


def _cell_weights(
    rnn: nn.RNNBase, layer: int
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    w_ih: Tensor = getattr(rnn, f"weight_ih_l{layer}")
    w_hh: Tensor = getattr(rnn, f"weight_hh_l{layer}")
    if not rnn.bias:
        return w_ih, w_hh, None, None
    return w_ih, w_hh, getattr(rnn, f"bias_ih_l{layer}"), getattr(rnn, f"bias_hh_l{layer}")


def top_layer_final(state: State, bidirectional: bool) -> Tensor:
    """The top layer's final h per row, directions concatenated: [N, D*H]."""
    h = state[0] if isinstance(state, tuple) else state
    if bidirectional:
        return torch.cat([h[-2], h[-1]], dim=-1)
    return h[-1]


def last_outputs(outputs: Tensor, lengths: Tensor, bidirectional: bool) -> Tensor:
    """`top_layer_final` read from the outputs [N, T, D*H] of `run_rnn`: each row's forward h at
    its last step (and backward h at step 0), the same values as in the final state."""
    rows = torch.arange(outputs.shape[0], device=outputs.device)
    last = outputs[rows, (lengths - 1).to(outputs.device)]  # [N, D*H]
    if not bidirectional:
        return last
    hidden = outputs.shape[-1] // 2
    return torch.cat([last[:, :hidden], outputs[:, 0, hidden:]], dim=-1)


def cast_state(state: State, dtype: torch.dtype) -> State:
    """`state` in `dtype` (the same tensors when they already are)."""
    if isinstance(state, tuple):
        h, c = state
        if h.dtype == dtype and c.dtype == dtype:
            return state
        return (h.to(dtype), c.to(dtype))
    return state if state.dtype == dtype else state.to(dtype)


def select_state(state: State, rows: Tensor) -> State:
    """Rows `rows` of a state (batch is dim 1)."""
    if isinstance(state, tuple):
        return (state[0].index_select(1, rows), state[1].index_select(1, rows))
    return state.index_select(1, rows)


def cat_states(states: list[State]) -> State:
    """Join states along the batch dimension."""
    first = states[0]
    if isinstance(first, tuple):
        hs = [s[0] for s in states if isinstance(s, tuple)]
        cs = [s[1] for s in states if isinstance(s, tuple)]
        return (torch.cat(hs, dim=1), torch.cat(cs, dim=1))
    return torch.cat([s for s in states if isinstance(s, Tensor)], dim=1)
