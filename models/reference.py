"""Readable reference cells written straight from the equations of DESIGN §1.

Slow on purpose: one sequence, one step, one gate per line. Tests prove the fast path
(`models.recurrent`) computes the same on the same weights. Weights use PyTorch's layout: W_ih
[G*H, F] stacks the gates' input matrices (LSTM i,f,g,o; GRU r,z,n), so X_t W_xi = x @ W_ii.T.
Shapes: T = time, F = inputs, H = hidden, L = layers, D = directions.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from models.recurrent import Cell, State


def rnn_cell(x: Tensor, h: Tensor, w: Mapping[str, Tensor], relu: bool = False) -> Tensor:
    """Elman: H_t = φ(X_t W_xh + H_{t−1} W_hh + b_h), φ = tanh or relu."""
    pre = x @ w["W_ih"].T + w["b_ih"] + h @ w["W_hh"].T + w["b_hh"]
    return torch.relu(pre) if relu else torch.tanh(pre)


def lstm_cell(x: Tensor, h: Tensor, c: Tensor, w: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
    """LSTM: I, F, O = σ(X W_x· + H W_h· + b_·); C~ = tanh(…); C = F⊙C + I⊙C~; H = O⊙tanh(C)."""
    W_xi, W_xf, W_xc, W_xo = w["W_ih"].chunk(4)
    W_hi, W_hf, W_hc, W_ho = w["W_hh"].chunk(4)
    b_xi, b_xf, b_xc, b_xo = w["b_ih"].chunk(4)
    b_hi, b_hf, b_hc, b_ho = w["b_hh"].chunk(4)
    I = torch.sigmoid(x @ W_xi.T + b_xi + h @ W_hi.T + b_hi)  # noqa: E741 (the equation's name)
    F = torch.sigmoid(x @ W_xf.T + b_xf + h @ W_hf.T + b_hf)
    O = torch.sigmoid(x @ W_xo.T + b_xo + h @ W_ho.T + b_ho)  # noqa: E741
    C_tilde = torch.tanh(x @ W_xc.T + b_xc + h @ W_hc.T + b_hc)
    C = F * c + I * C_tilde
    H = O * torch.tanh(C)
    return H, C


def gru_cell(x: Tensor, h: Tensor, w: Mapping[str, Tensor], reset_after: bool) -> Tensor:
    """GRU: R, Z = σ(X W_x· + H W_h· + b_·); H = Z⊙H + (1 − Z)⊙H~, with the candidate
    H~ = tanh(X W_xh + b + R⊙(H W_hh + b')) (reset_after) or tanh(X W_xh + b + (R⊙H) W_hh + b')."""
    W_xr, W_xz, W_xh = w["W_ih"].chunk(3)
    W_hr, W_hz, W_hh = w["W_hh"].chunk(3)
    b_xr, b_xz, b_xh = w["b_ih"].chunk(3)
    b_hr, b_hz, b_hh = w["b_hh"].chunk(3)
    R = torch.sigmoid(x @ W_xr.T + b_xr + h @ W_hr.T + b_hr)
    Z = torch.sigmoid(x @ W_xz.T + b_xz + h @ W_hz.T + b_hz)
    if reset_after:
        H_tilde = torch.tanh(x @ W_xh.T + b_xh + R * (h @ W_hh.T + b_hh))
    else:
        H_tilde = torch.tanh(x @ W_xh.T + b_xh + (R * h) @ W_hh.T + b_hh)
    return Z * h + (1 - Z) * H_tilde


def run_direction(
    x: Tensor,
    w: Mapping[str, Tensor],
    cell: Cell,
    state: tuple[Tensor, Tensor],
    relu: bool = False,
    reset_after: bool = True,
) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """Run one cell over x [T, F] from (h, c) [H] (c unused except for LSTM) → ([T, H], (h, c))."""
    h, c = state
    outputs = []
    for t in range(x.shape[0]):
        if cell == "rnn":
            h = rnn_cell(x[t], h, w, relu)
        elif cell == "lstm":
            h, c = lstm_cell(x[t], h, c, w)
        else:
            h = gru_cell(x[t], h, w, reset_after)
        outputs.append(h)
    return torch.stack(outputs), (h, c)


def run_reference(
    params: Mapping[str, Tensor],
    cell: Cell,
    x: Tensor,
    num_layers: int,
    bidirectional: bool,
    initial_state: State | None = None,
    relu: bool = False,
    reset_after: bool = True,
) -> tuple[Tensor, State]:
    """A deep (bi)directional RNN over one sequence x [T, F], with PyTorch-named `params`.

    Layer l reads layer l−1's outputs; bidirectional = a forward run and a run on the reversed
    input, concatenated. Returns (outputs [T, D*H], final state [L*D, H] (LSTM: (h, c))).
    """
    directions = 2 if bidirectional else 1
    hidden = params["weight_hh_l0"].shape[1]
    zeros = x.new_zeros(num_layers * directions, hidden)
    if initial_state is None:
        h0, c0 = zeros, zeros
    elif isinstance(initial_state, tuple):
        h0, c0 = initial_state
    else:
        h0, c0 = initial_state, zeros
    finals_h, finals_c = [], []
    layer_input = x
    for layer in range(num_layers):
        outputs = []
        for direction in range(directions):
            suffix = f"l{layer}" + ("_reverse" if direction == 1 else "")
            w = {
                "W_ih": params[f"weight_ih_{suffix}"],
                "W_hh": params[f"weight_hh_{suffix}"],
                "b_ih": params[f"bias_ih_{suffix}"],
                "b_hh": params[f"bias_hh_{suffix}"],
            }
            index = layer * directions + direction
            seq = layer_input if direction == 0 else layer_input.flip(0)
            out, (h, c) = run_direction(seq, w, cell, (h0[index], c0[index]), relu, reset_after)
            outputs.append(out if direction == 0 else out.flip(0))
            finals_h.append(h)
            finals_c.append(c)
        layer_input = torch.cat(outputs, dim=-1)
    h_n = torch.stack(finals_h)
    if cell == "lstm":
        return layer_input, (h_n, torch.stack(finals_c))
    return layer_input, h_n
