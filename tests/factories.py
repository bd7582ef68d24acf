"""Test factories shared by every test module: configs and real checkpoints on disk.

`write_model` writes through the real `models.checkpoint.save`, with random weights that are
deterministic in `seed`. Keep these signatures stable: everyone's tests use them.
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import Any, Literal

import torch

from models.checkpoint import build_model, save
from models.config import ModelConfig

# Input text vocab: "<pad>" = 0, "<unk>" = 1, then characters.
CHARS = list(string.ascii_lowercase + string.digits + " .,!?'-")
CHAR_VOCAB = ["<pad>", "<unk>", *CHARS]
# Target vocab of seq2seq models: "<pad>" = 0, "<bos>" = 1, "<eos>" = 2, "<unk>" = 3, characters.
TARGET_VOCAB = ["<pad>", "<bos>", "<eos>", "<unk>", *CHARS]
TOKENS_VOCAB_SIZE = 20
EMBEDDING_SIZE = 8


def make_config(
    task: Literal["encode", "seq2seq"] = "encode",
    input_type: Literal["features", "tokens", "text"] = "features",
    cell: Literal["rnn", "lstm", "gru"] = "lstm",
    num_layers: int = 1,
    bidirectional: bool = False,
    hidden_size: int = 16,
    input_size: int = 8,
    vocab_size: int | None = None,
    attention: bool = False,
    head: int | list[str] | None = None,
    pooling: Literal["last", "mean", "max"] = "last",
    reset_after: bool | None = None,
    nonlinearity: Literal["tanh", "relu"] | None = None,
    serving: dict[str, Any] | None = None,
    max_length: int = 20,
) -> ModelConfig:
    """A valid config; text inputs use the char tokenizer over CHAR_VOCAB (vocab_size follows)."""
    raw_input: dict[str, Any]
    if input_type == "features":
        raw_input = {"type": "features", "size": input_size}
    elif input_type == "tokens":
        raw_input = {
            "type": "tokens",
            "vocab_size": vocab_size or TOKENS_VOCAB_SIZE,
            "embedding_size": EMBEDDING_SIZE,
        }
    else:
        raw_input = {
            "type": "text",
            "vocab_size": vocab_size or len(CHAR_VOCAB),
            "embedding_size": EMBEDDING_SIZE,
            "tokenizer": "char",
            "vocab": "vocab.json",
        }
    encoder: dict[str, Any] = {
        "cell": cell,
        "hidden_size": hidden_size,
        "num_layers": num_layers,
        "bidirectional": bidirectional,
    }
    if reset_after is not None:
        encoder["reset_after"] = reset_after
    if nonlinearity is not None:
        encoder["nonlinearity"] = nonlinearity
    raw: dict[str, Any] = {
        "format": "rnnserve/v1",
        "task": task,
        "input": raw_input,
        "encoder": encoder,
        "pooling": pooling,
    }
    if head is not None:
        raw["head"] = (
            {"size": head} if isinstance(head, int) else {"size": len(head), "labels": list(head)}
        )
    if task == "seq2seq":
        decoder: dict[str, Any] = {
            "hidden_size": hidden_size * (2 if bidirectional else 1),
            "num_layers": num_layers,
            "embedding_size": EMBEDDING_SIZE,
            "vocab_size": len(TARGET_VOCAB),
            "attention": "additive" if attention else "none",
            "bos_id": 1,
            "eos_id": 2,
            "max_length": max_length,
            "vocab": "target_vocab.json",
        }
        if attention:
            decoder["attention_size"] = 16
        raw["decoder"] = decoder
    if serving is not None:
        raw["serving"] = serving
    return ModelConfig.model_validate(raw)


def write_model(
    repository: Path,
    name: str,
    version: int = 1,
    config: ModelConfig | None = None,
    seed: int = 0,
    **make_config_kwargs: Any,
) -> Path:
    """Write repository/name/version with random weights (deterministic in `seed`); returns it."""
    if config is None:
        config = make_config(**make_config_kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_model(config)
    vocab = CHAR_VOCAB if config.input_vocab_path is not None else None
    target = TARGET_VOCAB if config.decoder is not None and config.decoder.vocab else None
    return save(model, Path(repository) / name / str(version), vocab=vocab, target_vocab=target)
