"""Encoder models: padding never changes a result, streaming continuation, pooling, the head."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from models.checkpoint import build_model
from models.encoder import EncoderModel, collate
from models.tokenizer import Tokenizer
from tests.factories import CHAR_VOCAB, make_config

VARIANTS: list[dict[str, Any]] = [
    {"cell": "rnn"},
    {"cell": "rnn", "nonlinearity": "relu"},
    {"cell": "lstm"},
    {"cell": "gru", "reset_after": True},
    {"cell": "gru", "reset_after": False},
]


def _model(seed: int = 0, **kwargs: Any) -> EncoderModel:
    torch.manual_seed(seed)
    model = build_model(make_config(hidden_size=6, input_size=4, **kwargs))
    assert isinstance(model, EncoderModel)
    return model.eval()


MODELS = {
    (i, bi, layers): _model(**v, bidirectional=bi, num_layers=layers)
    for i, v in enumerate(VARIANTS)
    for bi in (False, True)
    for layers in (1, 2)
}


@pytest.mark.parametrize("key", sorted(MODELS), ids=str)
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    lengths=st.lists(st.integers(1, 7), min_size=1, max_size=5),
    pad=st.integers(0, 3),
    pooling=st.sampled_from(["last", "mean", "max", "none"]),
    seed=st.integers(0, 1000),
)
def test_batch_invariance(
    key: tuple[int, bool, int], lengths: list[int], pad: int, pooling: str, seed: int
) -> None:
    """A sequence's encoding is the same alone or in any batch, with any padding values."""
    model = MODELS[key]
    generator = torch.Generator().manual_seed(seed)
    sequences = [torch.randn(n, 4, generator=generator) for n in lengths]
    inputs, lens = collate(sequences)
    # Garbage in the padding (and extra padded steps) must not matter.
    inputs = torch.cat([inputs, torch.randn(len(lengths), pad, 4, generator=generator)], dim=1)
    for row, n in enumerate(lengths):
        inputs[row, n:] = torch.randn(inputs.shape[1] - n, 4, generator=generator) * 100
    with torch.no_grad():
        batched = model(inputs, lens, pooling=pooling)  # type: ignore[arg-type]
        for row, sequence in enumerate(sequences):
            alone = model(sequence[None], torch.tensor([len(sequence)]), pooling=pooling)  # type: ignore[arg-type]
            if pooling == "none":
                n = len(sequence)
                torch.testing.assert_close(batched.encodings[row, :n], alone.encodings[0])
                assert bool((batched.encodings[row, n:] == 0).all())
            else:
                torch.testing.assert_close(batched.encodings[row], alone.encodings[0])


torch.manual_seed(0)
# Hidden ≥ 128: the size that takes the segmented path on long batches (models/recurrent.py).
LONG_LSTM = build_model(
    make_config(cell="lstm", hidden_size=128, input_size=4, num_layers=2, head=["a", "b"])
).eval()


@pytest.mark.parametrize("key", [*sorted(MODELS), "long-lstm"], ids=str)
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    lengths=st.lists(st.integers(1, 90), min_size=1, max_size=9),
    pooling=st.sampled_from(["last", "mean", "max", "none"]),
    seed=st.integers(0, 1000),
)
def test_leaving_out_the_final_state_changes_no_answer(
    key: tuple[int, bool, int] | str, lengths: list[int], pooling: str, seed: int
) -> None:
    """`return_state=False` (outputs only: fewer segments, no replays) answers the same."""
    model = LONG_LSTM if key == "long-lstm" else MODELS[key]
    if key == "long-lstm":
        lengths = [*lengths, 70]  # ≥ 64 steps: the segmented path
    generator = torch.Generator().manual_seed(seed)
    inputs, lens = collate([torch.randn(n, 4, generator=generator) for n in lengths])
    with torch.no_grad():
        full = model(inputs, lens, pooling=pooling)  # type: ignore[arg-type]
        lean = model(inputs, lens, pooling=pooling, return_state=False)  # type: ignore[arg-type]
    assert lean.final_state is None and full.final_state is not None
    torch.testing.assert_close(lean.encodings, full.encodings)
    torch.testing.assert_close(lean.final, full.final)
    if full.scores is not None:
        torch.testing.assert_close(lean.scores, full.scores)


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(map(str, v.values())))
def test_chunked_continuation_equals_whole(variant: dict[str, Any]) -> None:
    """encoder(chunk2, initial_state=final_state(chunk1)) == encoder(chunk1 + chunk2)."""
    model = _model(**variant, num_layers=2)
    whole = [torch.randn(9, 4), torch.randn(5, 4)]
    split = [4, 2]
    with torch.no_grad():
        full = model(*collate(whole), pooling="none")
        first = model(*collate([s[:k] for s, k in zip(whole, split, strict=True)]), pooling="none")
        second = model(
            *collate([s[k:] for s, k in zip(whole, split, strict=True)]),
            pooling="none",
            initial_state=first.final_state,
        )
    for row, (s, k) in enumerate(zip(whole, split, strict=True)):
        torch.testing.assert_close(
            second.encodings[row, : len(s) - k], full.encodings[row, k : len(s)]
        )
    assert full.final_state is not None and second.final_state is not None
    full_h = full.final_state[0] if isinstance(full.final_state, tuple) else full.final_state
    second_h = (
        second.final_state[0] if isinstance(second.final_state, tuple) else second.final_state
    )
    torch.testing.assert_close(second_h, full_h)


def test_pooling_definitions_bidirectional() -> None:
    """ "last" = concat(forward final, backward final); mean/max over real steps only."""
    model = _model(cell="gru", bidirectional=True, num_layers=2)
    inputs, lengths = collate([torch.randn(5, 4), torch.randn(3, 4)])
    with torch.no_grad():
        steps = model(inputs, lengths, pooling="none").encodings  # [N, T, 12]
        last = model(inputs, lengths, pooling="last").encodings
        mean = model(inputs, lengths, pooling="mean").encodings
        biggest = model(inputs, lengths, pooling="max").encodings
    for row, n in enumerate(lengths.tolist()):
        torch.testing.assert_close(last[row, :6], steps[row, n - 1, :6])  # forward ends at n-1
        torch.testing.assert_close(last[row, 6:], steps[row, 0, 6:])  # backward ends at 0
        torch.testing.assert_close(mean[row], steps[row, :n].mean(dim=0))
        torch.testing.assert_close(biggest[row], steps[row, :n].max(dim=0).values)


def test_head_reads_default_pooling_and_softmaxes_labels() -> None:
    model = _model(head=["neg", "pos", "neutral"], pooling="mean")
    regression = _model(head=2)
    inputs, lengths = collate([torch.randn(5, 4), torch.randn(2, 4)])
    with torch.no_grad():
        as_mean = model(inputs, lengths)
        as_last = model(inputs, lengths, pooling="last")
        raw = regression(inputs, lengths)
    assert as_mean.scores is not None and as_last.scores is not None and raw.scores is not None
    torch.testing.assert_close(as_mean.scores, as_last.scores)
    torch.testing.assert_close(as_mean.scores.sum(dim=-1), torch.ones(2))
    assert regression.head is not None
    torch.testing.assert_close(raw.scores, regression.head(raw.encodings))


def test_tokenizer_unknowns_and_decode() -> None:
    chars = Tokenizer(CHAR_VOCAB, "char")
    ids = chars.encode("ab\u00e9")
    assert ids == [CHAR_VOCAB.index("a"), CHAR_VOCAB.index("b"), 1]
    assert chars.decode([0, *chars.encode("hi there")]) == "hi there"
    words = Tokenizer(["<pad>", "<unk>", "<bos>", "<eos>", "hello", "world"], "whitespace")
    assert words.encode("  hello   there world ") == [4, 1, 5]
    assert words.decode([2, 4, 5, 3, 0]) == "hello world"


def test_token_input_model_runs() -> None:
    model = _model(input_type="tokens", cell="lstm", bidirectional=True)
    inputs, lengths = collate([torch.tensor([1, 2, 3]), torch.tensor([4])])
    with torch.no_grad():
        out = model(inputs, lengths)
    assert out.encodings.shape == (2, 12)


@settings(max_examples=50, deadline=None)
@given(text=st.text(alphabet=st.sampled_from([*CHAR_VOCAB[2:], "\u00e9", "\t"]), max_size=30))
def test_tokenizer_round_trip(text: str) -> None:
    """Known characters survive encode → decode; unknown ones become <unk> (id 1), one per char."""
    chars = Tokenizer(CHAR_VOCAB, "char")
    ids = chars.encode(text)
    assert len(ids) == len(text)
    known = "".join(c for c in text if c in CHAR_VOCAB)
    assert chars.decode([i for i in ids if i != 1]) == known
    assert all((i == 1) == (c not in CHAR_VOCAB) for i, c in zip(ids, text, strict=True))
