"""The fast paths equal the plain ones: `run_segmented` vs packing, `step_rnn` vs one step."""

from __future__ import annotations

from typing import Any, Literal

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from models import recurrent
from models.recurrent import (
    State,
    make_rnn,
    run_rnn,
    run_rnn_outputs,
    run_segmented,
    step_rnn,
)


def _packed(
    rnn: nn.Module, inputs: torch.Tensor, lengths: torch.Tensor, initial: State | None
) -> tuple[torch.Tensor, State]:
    packed = pack_padded_sequence(inputs, lengths, batch_first=True, enforce_sorted=False)
    out, state = rnn(packed, initial)
    outputs, _ = pad_packed_sequence(out, batch_first=True, total_length=inputs.shape[1])
    return outputs, state


def _close(a: State, b: State) -> None:
    pairs = zip(a, b, strict=True) if isinstance(a, tuple) else [(a, b)]
    for x, y in pairs:
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


@settings(max_examples=60, deadline=None)
@given(
    cell=st.sampled_from(["rnn", "lstm", "gru"]),
    layers=st.integers(1, 3),
    lengths=st.lists(st.integers(1, 40), min_size=1, max_size=12),
    segment=st.integers(1, 12),
    with_initial=st.booleans(),
    presorted=st.booleans(),
    extra_steps=st.integers(0, 9),
    seed=st.integers(0, 2**16),
)
def test_segmented_equals_packed(
    cell: Literal["rnn", "lstm", "gru"],
    layers: int,
    lengths: list[int],
    segment: int,
    with_initial: bool,
    presorted: bool,
    extra_steps: int,
    seed: int,
) -> None:
    torch.manual_seed(seed)
    if presorted:  # as the batcher sends them: longest first
        lengths = sorted(lengths, reverse=True)
    rnn = make_rnn(cell, 5, 6, layers)
    assert isinstance(rnn, nn.RNNBase)
    lens = torch.tensor(lengths)
    # Padding may run past the longest row (a caller's own padding): it must change nothing.
    inputs = torch.randn(len(lengths), max(lengths) + extra_steps, 5)
    initial: State | None = None
    if with_initial:
        h0 = torch.randn(layers, len(lengths), 6)
        initial = (h0, torch.randn_like(h0)) if cell == "lstm" else h0
    with torch.inference_mode():
        expected_out, expected_state = _packed(rnn, inputs, lens, initial)
        # Fixed-width segments, then the planned cuts (with and without final states).
        longest = max(lengths)
        fixed = [*range(segment, longest, segment), longest]
        outputs, state = run_segmented(rnn, inputs, lens, initial, fixed)
        planned_out, planned_state = run_segmented(rnn, inputs, lens, initial)
        outputs_only, no_state = recurrent._segmented(rnn, inputs, lens, initial, None, False)
    for out in (outputs, planned_out, outputs_only):
        torch.testing.assert_close(out, expected_out, rtol=1e-5, atol=1e-5)
    _close(state, expected_state)
    _close(planned_state, expected_state)
    assert no_state is None


@settings(max_examples=200, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 300), min_size=1, max_size=128),
    need_state=st.booleans(),
)
def test_planned_cuts_end_segments_where_rows_end(lengths: list[int], need_state: bool) -> None:
    ends = sorted(lengths, reverse=True)
    cuts = recurrent.plan_segments(ends, need_state)
    assert cuts == sorted(set(cuts)) and cuts[-1] == ends[0]
    assert set(cuts) <= set(lengths)
    assert len(cuts) <= recurrent.PLAN_MAX_POINTS


def test_the_plan_cuts_less_where_no_final_state_is_wanted() -> None:
    # NOTE: a cut costs a call (oneDNN reorders the weights each time); a row ending inside a
    # segment costs a replay only when its final state is wanted.
    ends = list(range(128, 16, -4))
    assert len(recurrent.plan_segments(ends, need_state=False)) < len(
        recurrent.plan_segments(ends, need_state=True)
    )
    # Equal lengths: one call, whatever is wanted.
    assert recurrent.plan_segments([64] * 32, True) == [64]


@pytest.mark.parametrize("need_state", [True, False])
def test_a_thinned_plan_still_equals_packing(need_state: bool) -> None:
    # NOTE: over PLAN_MAX_POINTS distinct lengths the plan cuts at some of them only, so rows
    # end inside segments (replayed when their state is wanted).
    torch.manual_seed(3)
    rnn = make_rnn("lstm", 5, 6, 2)
    assert isinstance(rnn, nn.RNNBase)
    lengths = torch.randperm(60) + 1  # 60 distinct lengths, unsorted
    inputs = torch.randn(60, 60, 5)
    with torch.inference_mode():
        expected_out, expected_state = _packed(rnn, inputs, lengths, None)
        outputs, state = recurrent._segmented(rnn, inputs, lengths, None, None, need_state)
    assert len(recurrent.plan_segments(sorted(lengths.tolist(), reverse=True))) <= 24
    torch.testing.assert_close(outputs, expected_out, rtol=1e-5, atol=1e-5)
    if need_state:
        assert state is not None
        _close(state, expected_state)


def test_cuts_that_stop_short_and_lengths_past_the_inputs_are_refused() -> None:
    rnn = make_rnn("lstm", 5, 6, 1)
    assert isinstance(rnn, nn.RNNBase)
    with torch.inference_mode(), pytest.raises(ValueError, match="last cut"):
        run_segmented(rnn, torch.randn(3, 8, 5), torch.tensor([8, 5, 3]), None, [3, 5])
    with torch.inference_mode(), pytest.raises(ValueError, match="exceeds"):
        run_segmented(rnn, torch.randn(2, 8, 5), torch.tensor([9, 5]))


def test_run_rnn_segments_long_lstm_batches_and_equals_packing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    taken: list[str] = []
    real = recurrent.run_segmented

    def spy(*args: Any, **kwargs: Any) -> tuple[torch.Tensor, State]:
        taken.append("segmented")
        return real(*args, **kwargs)

    monkeypatch.setattr(recurrent, "run_segmented", spy)
    torch.manual_seed(0)
    rnn = make_rnn("lstm", 4, 128, 2)  # big and long enough for the segmented path
    inputs = torch.randn(5, 70, 4)
    lengths = torch.tensor([70, 9, 33, 17, 64])
    with torch.inference_mode():
        outputs, state = run_rnn(rnn, inputs, lengths)
        expected_out, expected_state = _packed(rnn, inputs, lengths, None)
    assert taken == ["segmented"]
    torch.testing.assert_close(outputs, expected_out, rtol=1e-4, atol=1e-5)
    _close(state, expected_state)
    assert bool((outputs[1, 9:] == 0).all())  # zero past each length, as the contract says
    # Where it was measured to lose, the packed path stays: a GRU, a short batch, a small LSTM.
    with torch.inference_mode():
        run_rnn(make_rnn("gru", 4, 128, 2), inputs, lengths)
        run_rnn(rnn, inputs[:, :20], torch.tensor([20, 9, 13, 17, 20]))
        run_rnn(make_rnn("lstm", 4, 64, 2), inputs, lengths)
    assert taken == ["segmented"]


def test_outputs_alone_segment_smaller_and_shorter_lstm_batches(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    wanted: list[bool] = []
    real = recurrent._segmented

    def spy(*args: Any, need_state: bool) -> tuple[torch.Tensor, State | None]:
        wanted.append(need_state)
        return real(*args, need_state=need_state)

    monkeypatch.setattr(recurrent, "_segmented", spy)
    torch.manual_seed(0)
    small = make_rnn("lstm", 4, 64, 2)
    inputs = torch.randn(4, 12, 4)
    lengths = torch.tensor([12, 3, 9, 7])
    with torch.inference_mode():
        outputs = run_rnn_outputs(small, inputs, lengths)
        expected, _ = _packed(small, inputs, lengths, None)
        run_rnn(small, inputs, lengths)  # with states: packed at this size
        run_rnn_outputs(make_rnn("gru", 4, 64, 2), inputs, lengths)
    assert wanted == [False]
    torch.testing.assert_close(outputs, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "variant",
    [
        {"cell": "rnn", "nonlinearity": "tanh"},
        {"cell": "rnn", "nonlinearity": "relu"},
        {"cell": "lstm"},
        {"cell": "gru", "reset_after": True},
        {"cell": "gru", "reset_after": False},
    ],
    ids=lambda v: "-".join(str(x) for x in v.values()),
)
@pytest.mark.parametrize("layers", [1, 3])
def test_one_step_by_cells_equals_the_full_layer(variant: dict[str, Any], layers: int) -> None:
    torch.manual_seed(layers)
    rnn = make_rnn(
        variant["cell"],
        5,
        6,
        layers,
        nonlinearity=variant.get("nonlinearity", "tanh"),
        reset_after=variant.get("reset_after", True),
    )
    inputs = torch.randn(4, 5)
    h0 = torch.randn(layers, 4, 6)
    state: State = (h0, torch.randn_like(h0)) if variant["cell"] == "lstm" else h0
    with torch.inference_mode():
        output, new_state = step_rnn(rnn, inputs, state)
        expected_out, expected_state = run_rnn(
            rnn, inputs[:, None, :], torch.ones(4, dtype=torch.int64), state
        )
    torch.testing.assert_close(output, expected_out[:, 0], rtol=1e-5, atol=1e-6)
    _close(new_state, expected_state)
