"""The Open Inference Protocol's (KServe V2) model metadata, readiness and model repository,
decided once for both wires (service/http_api/v2_routes.py, service/grpc_api/v2_servicer.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from models.config import ModelConfig
from service.core.engine import Engine
from service.core.errors import NotFound
from service.core.types import VersionInfo


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


# -- the model repository --


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
