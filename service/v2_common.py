"""Open Inference Protocol (KServe V2) semantics shared by its REST and gRPC front-ends.

Server metadata, model metadata, readiness, request parameters and output tensors are decided
here once; service/v2_rest.py and service/v2_grpc.py only translate them to and from the wire.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import metadata
from typing import TYPE_CHECKING, Any, Literal, cast

import numpy as np

from models.config import ModelConfig
from service import validation
from service.codecs import V2Output
from service.errors import InvalidInput
from service.types import EncodeResult, GenerateResult

if TYPE_CHECKING:
    from service.engine import Engine

SERVER_NAME = "rnnserve"
Pooling = Literal["last", "mean", "max", "none"]


@functools.cache
def server_version() -> str:
    """The installed rnnserve package's version ("0.0.0" when run from an uninstalled tree)."""
    try:
        return metadata.version("rnnserve")
    except metadata.PackageNotFoundError:
        return "0.0.0"


# ---------------------------------------------------------------- model metadata


@dataclass(frozen=True, slots=True)
class TensorMetadata:
    """One input or output tensor a model declares; -1 marks a variable dimension."""

    name: str
    datatype: str
    shape: tuple[int, ...]


def input_metadata(config: ModelConfig) -> list[TensorMetadata]:
    """The input tensors a model takes (DESIGN §3): INPUT or TOKENS with optional LENGTHS, or TEXT.

    TEXT is [batch] strings with no time dimension to trim, so it takes no LENGTHS.
    """
    spec = config.input
    if spec.type == "text":
        return [TensorMetadata("TEXT", "BYTES", (-1,))]
    if spec.type == "tokens":
        main = TensorMetadata("TOKENS", "INT64", (-1, -1))
    else:
        main = TensorMetadata("INPUT", "FP32", (-1, -1, spec.size))
    return [main, TensorMetadata("LENGTHS", "INT64", (-1,))]


def has_output_text(config: ModelConfig) -> bool:
    """A seq2seq model with a target vocabulary answers OUTPUT_TEXT too."""
    return (
        config.task == "seq2seq" and config.decoder is not None and config.decoder.vocab is not None
    )


def output_metadata(config: ModelConfig) -> list[TensorMetadata]:
    """The output tensors a model answers with (an infer answers exactly these)."""
    if config.task == "seq2seq":
        outputs = [
            TensorMetadata("OUTPUT_TOKENS", "INT64", (-1, -1)),
            TensorMetadata("OUTPUT_LENGTHS", "INT64", (-1,)),
        ]
        if has_output_text(config):
            outputs.append(TensorMetadata("OUTPUT_TEXT", "BYTES", (-1,)))
        return outputs
    outputs = [TensorMetadata("ENCODING", "FP32", (-1, config.encoding_size))]
    if config.head is not None:
        outputs.append(TensorMetadata("SCORES", "FP32", (-1, config.head.size)))
        if config.head.labels is not None:
            outputs.append(TensorMetadata("LABELS", "BYTES", (-1,)))
    return outputs


def ready_versions(engine: Engine, name: str) -> list[str]:
    """The model's READY versions as V2 version strings (raises NotFound for an unknown model)."""
    return [str(v.version) for v in engine.model_info(name).versions if v.state == "READY"]


def model_ready(engine: Engine, name: str, version: int | None) -> bool:
    """Whether the model (or that version) takes inference now: READY and the server not draining.

    Raises NotFound for an unknown model or version.
    """
    info = engine.model_info(name, version)
    if engine.draining:
        return False
    return any(v.state == "READY" and version in (None, v.version) for v in info.versions)


# ---------------------------------------------------------------- request parameters


def parameter(
    params: Mapping[str, Any], name: str, kinds: tuple[type, ...], default: Any = None
) -> Any:
    """A request parameter of one of `kinds` (booleans only where `bool` is asked for)."""
    value = params.get(name)
    if value is None:
        return default
    if isinstance(value, bool) != (bool in kinds) or not isinstance(value, kinds):
        names = " or ".join(k.__name__ for k in kinds)
        raise InvalidInput(f"parameters.{name}", f"expected {names}, got {value!r}")
    return value


def timeout_s(params: Mapping[str, Any]) -> float | None:
    """`parameters.timeout_ms` in seconds, checked against the same bounds as the rnnserve API."""
    timeout_ms = parameter(params, "timeout_ms", (int, float))
    if timeout_ms is None:
        return None
    validation.check_timeout_ms(timeout_ms, "parameters.timeout_ms")
    return float(timeout_ms) / 1000


def pooling(params: Mapping[str, Any]) -> Pooling | None:
    """`parameters.pooling` (last, mean, max or none; absent: the model's default)."""
    value = parameter(params, "pooling", (str,))
    if value is not None and value not in validation.POOLINGS:
        raise InvalidInput(
            "parameters.pooling", f"must be one of {', '.join(validation.POOLINGS)}; got {value!r}"
        )
    return cast(Pooling | None, value)


def generate_options(params: Mapping[str, Any]) -> tuple[int | None, int]:
    """(max_length, beam_size) of a seq2seq infer; the engine checks them against its limits."""
    max_length = parameter(params, "max_length", (int,))
    beam_size = parameter(params, "beam_size", (int,), 1)
    return max_length, beam_size


# ---------------------------------------------------------------- output tensors


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
                f"outputs[{k}].name", f"unknown output {name!r}; this model has {sorted(by_name)}"
            )
        chosen.append(by_name[name])
    return chosen
