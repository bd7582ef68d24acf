"""The fast path computes the equations of DESIGN §1: reference cells vs fast path, same weights."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from models.recurrent import make_rnn, run_rnn
from models.reference import run_reference

CELLS: list[dict[str, Any]] = [
    {"cell": "rnn", "nonlinearity": "tanh"},
    {"cell": "rnn", "nonlinearity": "relu"},
    {"cell": "lstm"},
    {"cell": "gru", "reset_after": True},
    {"cell": "gru", "reset_after": False},
]


def _name(variant: dict[str, Any]) -> str:
    return "-".join(str(v) for v in variant.values())


@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("num_layers", [1, 3])
@pytest.mark.parametrize("variant", CELLS, ids=_name)
def test_fast_path_equals_reference(
    variant: dict[str, Any], num_layers: int, bidirectional: bool
) -> None:
    torch.manual_seed(num_layers * 10 + bidirectional)
    features, hidden = 5, 7
    rnn = make_rnn(
        variant["cell"],
        features,
        hidden,
        num_layers,
        bidirectional,
        variant.get("nonlinearity", "tanh"),
        variant.get("reset_after", True),
    )
    lengths = torch.tensor([6, 2, 4])
    inputs = torch.randn(3, 6, features)
    directions = 2 if bidirectional else 1
    h0 = torch.randn(num_layers * directions, 3, hidden) * 0.5
    initial = (h0, torch.randn_like(h0) * 0.5) if variant["cell"] == "lstm" else h0
    with torch.no_grad():
        outputs, state = run_rnn(rnn, inputs, lengths, initial)
        params = dict(rnn.named_parameters())
        for row, length in enumerate(lengths.tolist()):
            row_initial = (
                (initial[0][:, row], initial[1][:, row])
                if isinstance(initial, tuple)
                else initial[:, row]
            )
            ref_out, ref_state = run_reference(
                params,
                variant["cell"],
                inputs[row, :length],
                num_layers,
                bidirectional,
                row_initial,
                relu=variant.get("nonlinearity") == "relu",
                reset_after=variant.get("reset_after", True),
            )
            assert (outputs[row, :length] - ref_out).abs().max() <= 1e-5
            assert bool((outputs[row, length:] == 0).all())
            if isinstance(state, tuple):
                assert isinstance(ref_state, tuple)
                assert (state[0][:, row] - ref_state[0]).abs().max() <= 1e-5
                assert (state[1][:, row] - ref_state[1]).abs().max() <= 1e-5
            else:
                assert isinstance(ref_state, torch.Tensor)
                assert (state[:, row] - ref_state).abs().max() <= 1e-5
