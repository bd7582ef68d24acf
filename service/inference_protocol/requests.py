"""What an Open Inference Protocol (KServe V2) infer request means, decided once for both wires.

A front-end decodes the request's input tensors (`tensors.V2Tensor`, in request order) and its
parameters as plain values, and hands them to `infer_request`, which checks them against the
model (names, datatypes, shapes, batch 1..`max_sequences_per_request`, the main input's values
at most `limit × max_sequence_length × features`, LENGTHS, UTF-8; data is decoded only after the
shape checks) and builds the engine's request; `infer` runs it and answers output tensors. Errors
name the request's own path (`inputs[1].shape`, `inputs[0].data[3]`) on both wires.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from models.config import ModelConfig
from service.core import limits, validation
from service.core.engine import Engine
from service.core.errors import InvalidInput, shown
from service.core.types import (
    AnswerLimit,
    EncodeRequest,
    EncodeResult,
    GenerateRequest,
    GenerateResult,
    InputKind,
    SequenceData,
)
from service.inference_protocol.metadata import has_output_text, input_metadata
from service.inference_protocol.tensors import V2Output, V2Tensor

_FLOATS = ("FP16", "FP32", "FP64")
# NOTE: no UINT64: it does not fit the engine's int64 (large values would wrap around).
_INTS = ("INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32")


def infer_sequences(
    tensors: list[V2Tensor], config: ModelConfig, limit: int
) -> tuple[InputKind, list[SequenceData]]:
    """The engine's sequences of a V2 request's input tensors (all of them, in the request's order).

    Names, datatypes and shapes are checked against the model (batch, and values at most
    `limit` sequences of its max_sequence_length steps) before any tensor's data is decoded.
    Errors name the request's own path (`inputs[1].shape`, `inputs[0].data[3]`) on both wires.
    """
    names = [t.name for t in input_metadata(config)]
    main_name = names[0]
    positions: dict[str, int] = {}
    for i, tensor in enumerate(tensors):
        if tensor.name not in names:
            allowed = " and optional ".join(names)
            raise InvalidInput(
                f"inputs[{i}].name",
                f"unexpected input {shown(tensor.name)}; this model takes {allowed}",
            )
        if tensor.name in positions:
            raise InvalidInput(
                f"inputs[{i}].name",
                f"{shown(tensor.name)} appears twice (first as inputs[{positions[tensor.name]}])",
            )
        positions[tensor.name] = i
    if main_name not in positions:
        raise InvalidInput("inputs", f"input {main_name!r} is required by this model")
    i = positions[main_name]
    main, where = tensors[i], f"inputs[{i}]"
    kind = validation.model_kind(config)
    if kind == "text":
        return kind, _texts(main, where, limit)
    features = kind == "features"
    allowed_types = _FLOATS if features else _INTS
    if main.datatype not in allowed_types:
        raise InvalidInput(
            f"{where}.datatype", f"{main_name} must be {sorted(allowed_types)}, got {main.datatype}"
        )
    if len(main.shape) != (3 if features else 2):
        dims = "[batch, time, features]" if features else "[batch, time]"
        raise InvalidInput(f"{where}.shape", f"{main_name} must be {dims}, got {main.shape}")
    batch, steps = main.shape[0], main.shape[1]
    _check_batch(batch, where, limit)
    _check_values(main, where, limit, config)
    data = main.data
    assert isinstance(data, np.ndarray)  # every numeric datatype decodes to an array
    data = data.astype(np.float32 if features else np.int64, copy=False)
    if "LENGTHS" not in positions:
        return kind, list(data)
    j = positions["LENGTHS"]
    lengths = _lengths(tensors[j], f"inputs[{j}]", batch, steps)
    return kind, [data[b, :n] for b, n in enumerate(lengths)]


def _check_batch(batch: int, where: str, limit: int) -> None:
    if batch == 0:
        raise InvalidInput(f"{where}.shape", "the batch needs at least 1 sequence, got 0")
    if batch > limit:
        raise InvalidInput(f"{where}.shape", f"at most {limit} sequences per request, got {batch}")


def _check_values(tensor: V2Tensor, where: str, limit: int, config: ModelConfig) -> None:
    """Refuse a main input larger than the largest request the model takes (`limit` sequences
    of max_sequence_length steps), whatever its padding, before its data is decoded."""
    longest = config.serving.max_sequence_length
    features = getattr(config.input, "size", 1)
    most = limit * longest * features
    values = math.prod(tensor.shape)
    if values > most:
        per_step = f" × {features} features" if len(tensor.shape) == 3 else ""
        raise InvalidInput(
            f"{where}.shape",
            f"{tensor.shape} holds {values} values; this model takes at most {most} "
            f"({limit} sequences × {longest} steps{per_step})",
        )


def _lengths(tensor: V2Tensor, where: str, batch: int, steps: int) -> list[int]:
    if tensor.datatype not in _INTS:
        raise InvalidInput(
            f"{where}.datatype", f"LENGTHS must be {sorted(_INTS)}, got {tensor.datatype}"
        )
    if tensor.shape != [batch]:
        raise InvalidInput(
            f"{where}.shape", f"LENGTHS must be [{batch}] (one per sequence), got {tensor.shape}"
        )
    assert isinstance(tensor.data, np.ndarray)
    lengths: list[int] = tensor.data.tolist()
    for b, n in enumerate(lengths):
        if not 1 <= n <= steps:
            raise InvalidInput(f"{where}.data[{b}]", f"length must be in 1..{steps}, got {n}")
    return lengths


def _texts(tensor: V2Tensor, where: str, limit: int) -> list[SequenceData]:
    if tensor.datatype != "BYTES":
        raise InvalidInput(f"{where}.datatype", f"TEXT must be BYTES, got {tensor.datatype}")
    shape = tensor.shape
    if not (len(shape) == 1 or (len(shape) == 2 and shape[1] == 1)):
        raise InvalidInput(f"{where}.shape", f"TEXT must be [batch] (or [batch, 1]), got {shape}")
    _check_batch(shape[0], where, limit)
    assert isinstance(tensor.data, list)
    texts: list[SequenceData] = []
    for b, raw in enumerate(tensor.data):
        try:
            texts.append(raw.decode("utf-8"))
        except UnicodeDecodeError:
            raise InvalidInput(f"{where}.data[{b}]", "TEXT elements must be UTF-8") from None
    return texts


# -- request parameters --


def parameter(
    params: Mapping[str, Any], name: str, kinds: tuple[type, ...], default: Any = None
) -> Any:
    """A request parameter of one of `kinds` (booleans only where `bool` is asked for)."""
    value = params.get(name)
    if value is None:
        return default
    if isinstance(value, bool) != (bool in kinds) or not isinstance(value, kinds):
        names = " or ".join(k.__name__ for k in kinds)
        raise InvalidInput(f"parameters.{name}", f"expected {names}, got {shown(repr(value))}")
    return value


def infer_request(
    model: str,
    version: int,
    config: ModelConfig,
    tensors: list[V2Tensor],
    params: Any,
    *,
    limit: int,
    deadline_s: float | None = None,
    answer_limit: AnswerLimit | None = None,
) -> EncodeRequest | GenerateRequest:
    """The engine's request of an infer of `version` (its number and config resolved): its
    sequences from `tensors` (at most `limit`), a GenerateRequest for a seq2seq model
    (parameters timeout_ms, max_length, beam_size), else an EncodeRequest (timeout_ms, pooling).
    `params` is the request's `parameters` as plain values (an object, or it is refused).

    `deadline_s` is the call's own remaining deadline, if the wire has one; the tighter wins.
    `answer_limit` bounds the encoding the wire would send.
    """
    kind, sequences = infer_sequences(tensors, config, limit)
    if not isinstance(params, Mapping):
        raise InvalidInput("parameters", "expected an object")
    timeout_ms = parameter(params, "timeout_ms", (int, float))
    timeout = limits.timeout_seconds(timeout_ms, deadline_s, "parameters.timeout_ms")
    if config.task == "seq2seq":
        return GenerateRequest(
            model=model,
            sequences=sequences,
            kind=kind,
            version=version,
            max_length=parameter(params, "max_length", (int,)),
            beam_size=parameter(params, "beam_size", (int,), 1),
            timeout_s=timeout,
        )
    pooling = validation.check_pooling(parameter(params, "pooling", (str,)), "parameters.pooling")
    return EncodeRequest(
        model=model,
        sequences=sequences,
        kind=kind,
        version=version,
        pooling=pooling,
        timeout_s=timeout,
        answer_limit=answer_limit,
    )


async def infer(
    engine: Engine, request: EncodeRequest | GenerateRequest, config: ModelConfig
) -> tuple[int, list[V2Output]]:
    """Run an infer request on the engine: the version that answered and its output tensors."""
    if isinstance(request, GenerateRequest):
        generated = await engine.generate(request)
        return generated.version, generate_outputs(generated, config)
    encoded = await engine.encode(request)
    return encoded.version, encode_outputs(encoded)


# -- output tensors --


def _padded(rows: list[np.ndarray], fill: float, dtype: type) -> np.ndarray:
    """[batch, time, ...] of per-sequence rows, `fill` past each row's end."""
    longest = max((row.shape[0] for row in rows), default=0)
    tail = rows[0].shape[1:] if rows else ()
    out = np.full((len(rows), longest, *tail), fill, dtype=dtype)
    for b, row in enumerate(rows):
        out[b, : row.shape[0]] = row
    return out


def encode_outputs(result: EncodeResult) -> list[V2Output]:
    """ENCODING ([batch, time, size] zero-padded for pooling "none"), + SCORES, LABELS."""
    if isinstance(result.encodings, list):
        encodings = _padded(result.encodings, 0.0, np.float32)
    else:
        encodings = np.asarray(result.encodings, dtype=np.float32)
    outputs = [V2Output("ENCODING", "FP32", encodings, list(encodings.shape))]
    if result.scores is not None:
        scores = np.asarray(result.scores, dtype=np.float32)
        outputs.append(V2Output("SCORES", "FP32", scores, list(scores.shape)))
    if result.labels is not None:
        labels = [label.encode() for label in result.labels]
        outputs.append(V2Output("LABELS", "BYTES", labels, [len(labels)]))
    return outputs


def generate_outputs(result: GenerateResult, config: ModelConfig) -> list[V2Output]:
    """OUTPUT_TOKENS (padded with -1), OUTPUT_LENGTHS, and OUTPUT_TEXT when the model has text."""
    n = len(result.outputs)
    lengths = np.array([len(o.tokens) for o in result.outputs], dtype=np.int64)
    tokens = _padded([np.asarray(o.tokens, dtype=np.int64) for o in result.outputs], -1, np.int64)
    outputs = [
        V2Output("OUTPUT_TOKENS", "INT64", tokens, list(tokens.shape)),
        V2Output("OUTPUT_LENGTHS", "INT64", lengths, [n]),
    ]
    if has_output_text(config):
        texts = [(o.text or "").encode() for o in result.outputs]
        outputs.append(V2Output("OUTPUT_TEXT", "BYTES", texts, [n]))
    return outputs


def requested_outputs(outputs: list[V2Output], names: list[str | None]) -> list[V2Output]:
    """The outputs named by the request, in its order (all when it names none)."""
    if not names:
        return outputs
    by_name = {o.name: o for o in outputs}
    chosen: list[V2Output] = []
    for k, name in enumerate(names):
        if name is None or name not in by_name:
            raise InvalidInput(
                f"outputs[{k}].name",
                f"unknown output {shown(name or '')}; this model has {sorted(by_name)}",
            )
        chosen.append(by_name[name])
    return chosen
