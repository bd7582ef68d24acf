"""The config.json contract: unknown keys and cross-field mistakes are refused with a reason."""

from typing import Any

import pytest
from pydantic import ValidationError

from models.config import ModelConfig


def _seq2seq(**decoder: Any) -> dict[str, Any]:
    dec = {
        "hidden_size": 64,
        "num_layers": 1,
        "embedding_size": 8,
        "vocab_size": 20,
        "attention": "additive",
        "attention_size": 16,
        "bos_id": 1,
        "eos_id": 2,
    }
    dec.update(decoder)
    return {
        "format": "rnnserve/v1",
        "task": "seq2seq",
        "input": {"type": "tokens", "vocab_size": 30, "embedding_size": 8},
        "encoder": {"cell": "gru", "hidden_size": 32, "bidirectional": True},
        "decoder": dec,
    }


def test_valid_seq2seq_config() -> None:
    cfg = ModelConfig.model_validate(_seq2seq())
    assert cfg.encoder.output_size == 64
    assert cfg.serving.max_batch_size == 64


def test_unknown_key_is_refused() -> None:
    raw = _seq2seq()
    raw["encoder"]["hiden_size"] = 3
    with pytest.raises(ValidationError, match="hiden_size"):
        ModelConfig.model_validate(raw)


def test_decoder_hidden_must_match_encoder_output() -> None:
    with pytest.raises(ValidationError, match=r"decoder.hidden_size \(32\) must equal"):
        ModelConfig.model_validate(_seq2seq(hidden_size=32))


def test_eos_outside_vocab() -> None:
    with pytest.raises(ValidationError, match=r"decoder\.eos_id = 25"):
        ModelConfig.model_validate(_seq2seq(eos_id=25))


def test_cell_specific_options() -> None:
    raw = _seq2seq()
    raw["encoder"]["nonlinearity"] = "relu"
    with pytest.raises(ValidationError, match="nonlinearity applies to cell 'rnn'"):
        ModelConfig.model_validate(raw)
