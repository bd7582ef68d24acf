"""Open Inference Protocol (KServe V2) semantics shared by its REST and gRPC front-ends.

Server metadata, model metadata, readiness, the model repository, input tensors, request
parameters and output tensors are decided here once; service/v2_rest.py and service/v2_grpc.py
(with service/grpc_convert.py) only translate them to and from the wire.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import metadata
from typing import TYPE_CHECKING, Any, Literal, cast

import numpy as np

from models.config import ModelConfig
from service import validation
from service.codecs import V2Output, V2Tensor
from service.errors import InvalidInput, NotFound, shown
from service.types import (
    AnswerLimit,
    EncodeRequest,
    EncodeResult,
    GenerateRequest,
    GenerateResult,
    InputKind,
    Protocol,
    Sequence,
    VersionInfo,
)

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


def precision_parameters(engine: Engine, name: str, version: int) -> dict[str, str]:
    """The model metadata's `parameters` (an extension of the protocol, as MLServer's): the
    dtype each part of the version computes in, `precision.<part>` → "bfloat16", or
    "bfloat16 from 32 rows, float32 below" for a part that switches by batch size."""
    precision = engine.registry.resolve(name, version).architecture.get("precision", {})
    parameters: dict[str, str] = {}
    for part, described in precision.items():
        text = described["dtype"]
        if "from_rows" in described:
            text += f" from {described['from_rows']} rows, {described['below']} below"
        parameters[f"precision.{part}"] = text
    return parameters


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


# ---------------------------------------------------------------- model repository


def repository_index(engine: Engine, ready_only: bool) -> list[tuple[str, VersionInfo]]:
    """(model name, version) of every version the server knows, or of the READY ones only."""
    return [
        (info.name, v)
        for info in engine.list_models()
        for v in info.versions
        if not ready_only or v.state == "READY"
    ]


async def repository_load(engine: Engine, name: str) -> None:
    """Load a model by name; as Triton, loading a model that has a READY version reloads it."""
    try:
        loaded = any(v.state == "READY" for v in engine.model_info(name).versions)
    except NotFound:
        loaded = False
    if loaded:
        await engine.reload(name)
    else:
        await engine.load(name)


# ---------------------------------------------------------------- input tensors

_FLOATS = ("FP16", "FP32", "FP64")
# NOTE: no UINT64: it does not fit the engine's int64 (large values would wrap around).
_INTS = ("INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32")


def infer_sequences(
    tensors: list[V2Tensor], config: ModelConfig, limit: int
) -> tuple[InputKind, list[Sequence]]:
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


def _texts(tensor: V2Tensor, where: str, limit: int) -> list[Sequence]:
    if tensor.datatype != "BYTES":
        raise InvalidInput(f"{where}.datatype", f"TEXT must be BYTES, got {tensor.datatype}")
    shape = tensor.shape
    if not (len(shape) == 1 or (len(shape) == 2 and shape[1] == 1)):
        raise InvalidInput(f"{where}.shape", f"TEXT must be [batch] (or [batch, 1]), got {shape}")
    _check_batch(shape[0], where, limit)
    assert isinstance(tensor.data, list)
    texts: list[Sequence] = []
    for b, raw in enumerate(tensor.data):
        try:
            texts.append(raw.decode("utf-8"))
        except UnicodeDecodeError:
            raise InvalidInput(f"{where}.data[{b}]", "TEXT elements must be UTF-8") from None
    return texts


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
        raise InvalidInput(f"parameters.{name}", f"expected {names}, got {shown(repr(value))}")
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
            "parameters.pooling",
            f"must be one of {', '.join(validation.POOLINGS)}; got {shown(value)}",
        )
    return cast(Pooling | None, value)


def generate_options(params: Mapping[str, Any]) -> tuple[int | None, int]:
    """(max_length, beam_size) of a seq2seq infer; the engine checks them against its limits."""
    max_length = parameter(params, "max_length", (int,))
    beam_size = parameter(params, "beam_size", (int,), 1)
    return max_length, beam_size


def infer_request(
    model: str,
    version: int,
    config: ModelConfig,
    kind: InputKind,
    sequences: list[Sequence],
    params: Mapping[str, Any],
    protocol: Protocol,
    *,
    endpoint: str = "infer",
    deadline_s: float | None = None,
    answer_limit: AnswerLimit | None = None,
) -> EncodeRequest | GenerateRequest:
    """The engine's request of an infer: a GenerateRequest for a seq2seq model (parameters
    timeout_ms, max_length, beam_size), else an EncodeRequest (timeout_ms, pooling).

    `deadline_s` is the call's own remaining deadline, if the wire has one; the tighter wins.
    `answer_limit` bounds the encoding the wire would send.
    """
    timeout = validation.tighter_timeout(timeout_s(params), deadline_s)
    if config.task == "seq2seq":
        max_length, beam_size = generate_options(params)
        return GenerateRequest(
            model=model,
            sequences=sequences,
            kind=kind,
            version=version,
            max_length=max_length,
            beam_size=beam_size,
            timeout_s=timeout,
            protocol=protocol,
            endpoint=endpoint,
        )
    return EncodeRequest(
        model=model,
        sequences=sequences,
        kind=kind,
        version=version,
        pooling=pooling(params),
        timeout_s=timeout,
        protocol=protocol,
        endpoint=endpoint,
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
                f"outputs[{k}].name",
                f"unknown output {shown(name or '')}; this model has {sorted(by_name)}",
            )
        chosen.append(by_name[name])
    return chosen
