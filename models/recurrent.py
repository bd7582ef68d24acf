"""The fast recurrent layer: nn.RNN / nn.LSTM / nn.GRU run on packed sequences, plus the
reset-before GRU that PyTorch does not have.

Shapes: N = batch, T = time, F = input features, H = hidden, L = layers, D = directions.
`State = Tensor | tuple[Tensor, Tensor]` in PyTorch's layout `[L*D, N, H]` (LSTM: `(h, c)`).
Parameter names and gate order are PyTorch's (`weight_ih_l{k}[_reverse]`; LSTM i,f,g,o; GRU
r,z,n) so vanilla state_dicts load without conversion.
"""

from __future__ import annotations

import math
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


def run_rnn(
    rnn: nn.Module, inputs: Tensor, lengths: Tensor, initial_state: State | None = None
) -> tuple[Tensor, State]:
    """Run `rnn` over a padded batch: inputs [N, T, F], lengths [N] (CPU int64, each ≥ 1).

    Returns (outputs [N, T, D*H], zero past each length; final state [L*D, N, H] taken at each
    row's own last step). Unequal lengths run packed, so padding never changes a result.
    """
    if isinstance(rnn, ResetBeforeGRU):
        assert initial_state is None or isinstance(initial_state, Tensor)
        return rnn(inputs, lengths, initial_state)
    steps = inputs.shape[1]
    lengths = lengths.cpu()
    if bool((lengths == steps).all()):
        # NOTE: every row is full length, so packing would change nothing; skip its cost.
        outputs, state = rnn(inputs, initial_state)
        return outputs, state
    packed = pack_padded_sequence(inputs, lengths, batch_first=True, enforce_sorted=False)
    packed_out, state = rnn(packed, initial_state)
    outputs, _ = pad_packed_sequence(packed_out, batch_first=True, total_length=steps)
    return outputs, state


def top_layer_final(state: State, bidirectional: bool) -> Tensor:
    """The top layer's final h per row, directions concatenated: [N, D*H]."""
    h = state[0] if isinstance(state, tuple) else state
    if bidirectional:
        return torch.cat([h[-2], h[-1]], dim=-1)
    return h[-1]


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
