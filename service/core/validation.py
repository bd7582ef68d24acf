"""Input checks of the engine, before anything joins a batch (one bad item never fails a batch).

Every error is `InvalidInput(field, message)`; fields use the wire's vocabulary (`inputs[3]`,
`tokens[0][17]`, `texts[2]`, `beam_size`), messages name the limit.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from models.config import FeaturesInput, ModelConfig, TextInput, TokensInput
from models.tokenizer import Tokenizer
from service.core.errors import InvalidInput, shown
from service.core.settings import MODEL_NAME_RULE, is_model_name
from service.core.types import POOLINGS, InputKind, Pooling, SequenceData

FIELD_OF_KIND: dict[str, str] = {"features": "inputs", "tokens": "tokens", "text": "texts"}


def model_kind(config: ModelConfig) -> InputKind:
    """The input kind a model reads."""
    if isinstance(config.input, FeaturesInput):
        return "features"
    if isinstance(config.input, TokensInput):
        return "tokens"
    return "text"


def check_model_name(name: str, field: str = "name") -> None:
    """Management takes repository names only (no paths, no URLs): `InvalidInput(field)` else."""
    if not is_model_name(name):
        raise InvalidInput(field, f"a model name is {MODEL_NAME_RULE}")


# NOTE: int() refuses strings of over 4300 digits (ValueError), and an error echoing a long
# string could outgrow gRPC's metadata limit: a longer version is refused unread.
MAX_VERSION_DIGITS = 19


def parse_version(
    text: str, field: str = "version", error: type[InvalidInput] = InvalidInput
) -> int:
    """A model version written on the wire as text: 1–19 digits 0-9, at least 1 (REST paths and
    V2 gRPC alike; "+1", " 1" or "1_0" are refused, not read as 1 or 10), else `error`."""
    if len(text) > MAX_VERSION_DIGITS:
        raise error(
            field,
            f"must be a positive integer of at most {MAX_VERSION_DIGITS} digits, "
            f"got {len(text)} characters",
        )
    # NOTE: str.isdigit() also takes other scripts' digits and superscripts ('²'), which int()
    # refuses or reads as something else: only 0-9 name a version.
    if not (text.isascii() and text.isdigit()) or int(text) < 1:
        raise error(field, f"must be a positive integer written with the digits 0-9, got {text!r}")
    return int(text)


def check_task(name: str, config: ModelConfig, task: str) -> None:
    """`InvalidInput("model")` when `name` is not a model of `task` (encode / seq2seq)."""
    if config.task != task:
        use = "encode" if config.task == "encode" else "generate"
        article = "an" if config.task == "encode" else "a"
        raise InvalidInput("model", f"model {name!r} is {article} {config.task} model; use {use}")


def check_pooling(pooling: str | None, field: str = "pooling") -> Pooling | None:
    """`pooling` as the engine's Pooling (None: the model's default), or `InvalidInput(field)`
    unless it is one of last, mean, max, none."""
    if pooling is not None and pooling not in POOLINGS:
        raise InvalidInput(field, f"must be one of {', '.join(POOLINGS)}; got {shown(pooling)}")
    return pooling


def sequences(
    config: ModelConfig,
    tokenizer: Tokenizer | None,
    kind: InputKind,
    items: list[SequenceData],
    *,
    max_sequences: int,
    max_text_length: int,
    field_offset: int = 0,
) -> list[np.ndarray]:
    """Check a request's sequences against the model; return model-ready arrays.

    Features → float32 [T, F]; tokens and text → int64 [T] (text tokenized here).
    """
    field = FIELD_OF_KIND.get(kind)
    if field is None:
        raise InvalidInput("kind", f"unknown input kind {kind!r}")
    expected = model_kind(config)
    if kind != expected:
        raise InvalidInput(
            field,
            f"this model reads {expected} input; send '{FIELD_OF_KIND[expected]}' instead",
        )
    if not items:
        raise InvalidInput(field, "at least one sequence is required")
    if len(items) > max_sequences:
        raise InvalidInput(
            field, f"{len(items)} sequences in one request; the limit is {max_sequences}"
        )
    limit = config.serving.max_sequence_length
    out: list[np.ndarray] = []
    for index, item in enumerate(items):
        name = f"{field}[{index + field_offset}]"
        if isinstance(config.input, FeaturesInput):
            array = _features(name, item, config.input.size)
        elif isinstance(config.input, TokensInput):
            array = _tokens(name, item, config.input.vocab_size)
        else:
            array = _text(name, item, config.input, tokenizer, max_text_length)
        if array.shape[0] == 0:
            raise InvalidInput(name, "empty sequence; at least one step is required")
        if array.shape[0] > limit:
            raise too_many_steps(name, array.shape[0], limit)
        out.append(array)
    return out


def too_many_steps(field: str, steps: int, limit: int) -> InvalidInput:
    """The refusal of a sequence longer than its model's max_sequence_length (`limit`)."""
    return InvalidInput(field, f"{steps} steps; this model's max_sequence_length is {limit}")


def _features(name: str, item: SequenceData, size: int) -> np.ndarray:
    if isinstance(item, str):
        raise InvalidInput(name, "expected a [time, features] array of numbers, got a string")
    array = np.asarray(item)
    if array.ndim != 2:
        if array.ndim == 1 and array.shape[0] == 0:
            raise InvalidInput(name, "empty sequence; at least one step is required")
        raise InvalidInput(name, f"expected a [time, {size}] array, got {array.ndim} dimension(s)")
    if array.shape[1] != size:
        raise InvalidInput(
            name,
            f"each step must have {size} features (the model's input size), got {array.shape[1]}",
        )
    if array.dtype.kind not in "fiu":  # floating, signed or unsigned integer
        raise InvalidInput(name, f"expected numbers, got {array.dtype}")
    array = np.ascontiguousarray(array, dtype=np.float32)
    if not np.isfinite(array).all():
        step = int(np.argwhere(~np.isfinite(array))[0][0])
        raise InvalidInput(f"{name}[{step}]", "NaN or infinite value (features must be finite)")
    return array


def _tokens(name: str, item: SequenceData, vocab_size: int) -> np.ndarray:
    if isinstance(item, str):
        raise InvalidInput(name, "expected a list of token ids, got a string")
    array = np.asarray(item)
    if array.ndim != 1:
        raise InvalidInput(name, f"expected a list of token ids, got {array.ndim} dimension(s)")
    if array.shape[0] and array.dtype.kind not in "iu":  # signed or unsigned integer
        raise InvalidInput(name, f"token ids must be integers, got {array.dtype}")
    array = np.ascontiguousarray(array, dtype=np.int64)
    outside = (array < 0) | (array >= vocab_size)
    # NOTE: `any` first: `flatnonzero` gives up the GIL, and getting it back from a busy device
    # thread costs the loop far more than the check.
    if outside.any():
        step = int(np.flatnonzero(outside)[0])
        raise InvalidInput(
            f"{name}[{step}]",
            f"token id {int(array[step])} is outside [0, {vocab_size}) (the vocabulary size)",
        )
    return array


def _text(
    name: str, item: SequenceData, spec: TextInput, tokenizer: Tokenizer | None, max_chars: int
) -> np.ndarray:
    if not isinstance(item, str):
        raise InvalidInput(name, "expected a string")
    if len(item) > max_chars:
        raise InvalidInput(name, f"{len(item)} characters; the limit is {max_chars}")
    if tokenizer is None:
        raise InvalidInput(name, "this model has no tokenizer for text input")
    ids = np.asarray(tokenizer.encode(item), dtype=np.int64)
    if ids.shape[0] == 0:
        raise InvalidInput(name, f"empty text (no {spec.tokenizer} tokens)")
    return ids


def generate_limits(
    config: ModelConfig, beam_size: int, max_length: int | None, max_beam_size: int
) -> int:
    """Check beam_size and max_length of a generate request; return the length limit to use."""
    assert config.decoder is not None
    if not 1 <= beam_size <= max_beam_size:
        raise InvalidInput("beam_size", f"must be between 1 and {max_beam_size}, got {beam_size}")
    limit = config.decoder.max_length
    if max_length is None:
        return limit
    if not 1 <= max_length <= limit:
        raise InvalidInput(
            "max_length", f"must be between 1 and {limit} (this model's limit), got {max_length}"
        )
    return max_length


# pydantic's error types → the project's words ({…} from the error's ctx and input).
_PYDANTIC_WORDS: dict[str, str] = {
    "missing": "is required",
    "extra_forbidden": "is not a field of this body",
    "literal_error": "must be one of {expected}, got {input}",
    "enum": "must be one of {expected}, got {input}",
    "greater_than": "must be greater than {gt}, got {input}",
    "greater_than_equal": "must be at least {ge}, got {input}",
    "less_than": "must be less than {lt}, got {input}",
    "less_than_equal": "must be at most {le}, got {input}",
    "int_type": "expected an integer, got {input}",
    "int_parsing": "expected an integer, got {input}",
    "int_from_float": "expected an integer, got {input}",
    "float_type": "expected a number, got {input}",
    "float_parsing": "expected a number, got {input}",
    "bool_type": "expected true or false, got {input}",
    "bool_parsing": "expected true or false, got {input}",
    "string_type": "expected a string, got {input}",
    "list_type": "expected a list, got {input}",
    "dict_type": "expected an object, got {input}",
    "model_type": "expected an object, got {input}",
    "model_attributes_type": "expected an object, got {input}",
    "too_short": "expected at least {min_length} items, got {actual_length}",
    "too_long": "expected at most {max_length} items, got {actual_length}",
}
_SHOWN_INPUT_CHARS = 60


def pydantic_problem(error: Mapping[str, Any]) -> str:
    """One pydantic error (an item of `ValidationError.errors()`) in the project's words: the
    rule and the value given, without pydantic's own prefixes ("Value error, ...")."""
    kind = str(error.get("type", ""))
    ctx = error.get("ctx") or {}
    if kind in ("value_error", "assertion_error") and "error" in ctx:
        return str(ctx["error"])
    template = _PYDANTIC_WORDS.get(kind)
    if template is None:
        message = str(error.get("msg", "invalid value"))
        return message[:1].lower() + message[1:]
    shown_input = repr(error.get("input"))
    if len(shown_input) > _SHOWN_INPUT_CHARS:
        shown_input = shown_input[:_SHOWN_INPUT_CHARS] + "…"
    values = {
        key: str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)
        for key, value in ctx.items()
    }
    try:
        return template.format(**values, input=shown_input)
    except KeyError:
        message = str(error.get("msg", "invalid value"))
        return message[:1].lower() + message[1:]
