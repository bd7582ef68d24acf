"""Checkpoint round trip for every variant, and every kind of bad checkpoint refused clearly."""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from models.checkpoint import CheckpointError, build_model, expected_shapes, load
from models.encoder import EncoderModel, collate
from models.seq2seq import Seq2SeqModel
from tests.factories import CHAR_VOCAB, TARGET_VOCAB, make_config, write_model

CELLS: list[dict[str, Any]] = [
    {"cell": "rnn"},
    {"cell": "rnn", "nonlinearity": "relu"},
    {"cell": "lstm"},
    {"cell": "gru", "reset_after": True},
    {"cell": "gru", "reset_after": False},
]
VARIANTS: list[dict[str, Any]] = [
    {**cell, "num_layers": layers, "bidirectional": bi}
    for cell in CELLS
    for layers in (1, 2)
    for bi in (False, True)
]


def _id(v: dict[str, Any]) -> str:
    return "-".join(f"{k}={val}" for k, val in v.items())


@pytest.mark.parametrize("variant", VARIANTS, ids=_id)
def test_encode_round_trip(tmp_path: Path, variant: dict[str, Any]) -> None:
    path = write_model(tmp_path, "m", seed=3, head=["a", "b"], **variant)
    torch.manual_seed(3)
    original = build_model(make_config(head=["a", "b"], **variant))
    loaded = load(path)
    assert loaded.config == original.config
    assert isinstance(loaded.model, EncoderModel) and not loaded.model.training
    inputs, lengths = collate([torch.randn(5, 8), torch.randn(2, 8)])
    with torch.no_grad():
        expected = original.eval()(inputs, lengths)
        actual = loaded.model(inputs, lengths)
    torch.testing.assert_close(actual.encodings, expected.encodings, rtol=0, atol=0)
    assert actual.scores is not None and expected.scores is not None
    torch.testing.assert_close(actual.scores, expected.scores, rtol=0, atol=0)
    assert set(loaded.model.state_dict()) == set(expected_shapes(loaded.config))


@pytest.mark.parametrize("attention", [False, True], ids=["context", "attention"])
@pytest.mark.parametrize("variant", VARIANTS, ids=_id)
def test_seq2seq_round_trip(tmp_path: Path, variant: dict[str, Any], attention: bool) -> None:
    kwargs = {"task": "seq2seq", "input_type": "text", "attention": attention, **variant}
    path = write_model(tmp_path, "s", seed=5, **kwargs)
    torch.manual_seed(5)
    original = build_model(make_config(**kwargs)).eval()
    loaded = load(path)
    assert isinstance(loaded.model, Seq2SeqModel)
    assert loaded.input_tokenizer is not None and loaded.output_tokenizer is not None
    assert loaded.output_tokenizer.vocab == TARGET_VOCAB
    inputs, lengths = collate(
        [torch.tensor(loaded.input_tokenizer.encode(t)) for t in ["hi", "abc"]]
    )
    with torch.no_grad():
        assert loaded.model.generate(inputs, lengths, max_length=6) == original.generate(
            inputs, lengths, max_length=6
        )
    assert set(loaded.model.state_dict()) == set(expected_shapes(loaded.config))


def test_dtype_and_text_round_trip(tmp_path: Path) -> None:
    path = write_model(tmp_path, "t", input_type="text", cell="gru")
    loaded = load(path, dtype=torch.float64)
    assert loaded.input_tokenizer is not None
    assert loaded.input_tokenizer.vocab == CHAR_VOCAB
    assert all(p.dtype == torch.float64 for p in loaded.model.parameters())


# ---------------------------------------------------------------------------- bad checkpoints


def _good(tmp_path: Path, **kwargs: Any) -> Path:
    return write_model(tmp_path, "bad", **kwargs)


def _refused(path: Path, *fragments: str) -> CheckpointError:
    with pytest.raises(CheckpointError) as info:
        load(path)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, message
    return info.value


def test_missing_config(tmp_path: Path) -> None:
    path = _good(tmp_path)
    (path / "config.json").unlink()
    _refused(path, str(path / "config.json"), "missing")


def test_malformed_config_json(tmp_path: Path) -> None:
    path = _good(tmp_path)
    (path / "config.json").write_text('{"format": "rnnserve/v1",')
    _refused(path, "config.json", "malformed JSON at line 1")


def test_config_schema_error_names_field(tmp_path: Path) -> None:
    path = _good(tmp_path)
    raw = json.loads((path / "config.json").read_text())
    raw["encoder"]["hidden_size"] = -3
    raw["encoder"]["hiden"] = 1
    (path / "config.json").write_text(json.dumps(raw))
    _refused(path, "config.json", "encoder.hidden_size", "encoder.hiden")


def test_missing_unexpected_and_wrong_shape_tensors(tmp_path: Path) -> None:
    path = _good(tmp_path, cell="lstm", num_layers=2)
    tensors = load_file(str(path / "model.safetensors"))
    del tensors["encoder.rnn.weight_hh_l1"]
    tensors["encoder.rnn.extra"] = torch.zeros(2)
    tensors["encoder.rnn.bias_ih_l0"] = torch.zeros(63)
    save_file(tensors, str(path / "model.safetensors"))
    _refused(
        path,
        "model.safetensors",
        "missing tensors: encoder.rnn.weight_hh_l1",
        "unexpected tensors: encoder.rnn.extra",
        "encoder.rnn.bias_ih_l0 is [63], expected [64]",
    )


def test_non_finite_weights(tmp_path: Path) -> None:
    path = _good(tmp_path)
    tensors = load_file(str(path / "model.safetensors"))
    tensors["encoder.rnn.weight_ih_l0"][3, 1] = float("nan")
    save_file(tensors, str(path / "model.safetensors"))
    _refused(path, "model.safetensors", "encoder.rnn.weight_ih_l0", "non-finite")


def test_truncated_safetensors(tmp_path: Path) -> None:
    path = _good(tmp_path)
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) - 100])
    _refused(path, "model.safetensors", "truncated")
    (path / "model.safetensors").write_bytes(data[:5])
    _refused(path, "model.safetensors", "truncated")


def test_pickle_refused_and_never_run(tmp_path: Path) -> None:
    path = _good(tmp_path)
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self) -> tuple[Any, ...]:
            return (marker.write_text, ("ran",))

    (path / "model.safetensors").write_bytes(pickle.dumps(Exploit(), protocol=4))
    _refused(path, "model.safetensors", "pickle")
    (path / "model.safetensors").unlink()
    torch.save({"w": torch.zeros(1)}, path / "model.pt")
    _refused(path, "model.pt", "pickle checkpoints are refused")
    assert not marker.exists()


def test_vocab_size_mismatch(tmp_path: Path) -> None:
    path = _good(tmp_path, input_type="text")
    (path / "vocab.json").write_text(json.dumps(CHAR_VOCAB[:-1]))
    _refused(path, "vocab.json", f"vocab has {len(CHAR_VOCAB) - 1} tokens", "vocab_size")


def test_target_vocab_special_tokens(tmp_path: Path) -> None:
    path = _good(tmp_path, task="seq2seq", input_type="tokens")
    swapped = list(TARGET_VOCAB)
    swapped[1], swapped[2] = swapped[2], swapped[1]
    (path / "target_vocab.json").write_text(json.dumps(swapped))
    _refused(path, "target_vocab.json", 'token 1 must be "<bos>"')


def test_missing_weights_file(tmp_path: Path) -> None:
    path = _good(tmp_path)
    (path / "model.safetensors").unlink()
    _refused(path, "model.safetensors", "missing")


def test_vocab_name_outside_folder(tmp_path: Path) -> None:
    path = _good(tmp_path, input_type="text")
    raw = json.loads((path / "config.json").read_text())
    raw["input"]["vocab"] = "../../vocab.json"
    (path / "config.json").write_text(json.dumps(raw))
    _refused(path, "config.json", "must be a plain file name")
