"""Pydantic v2 models of every HTTP request and response body (rnnserve API and V2), with examples.

The big number arrays (`inputs`, `tokens`, `texts`, V2 `data`) are declared with their full type for
the OpenAPI document but marked `SkipValidation`: service/http_api/json_codecs.py turns them into
numpy arrays in one C call each and names the offending element when they are malformed.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, SkipValidation, model_validator

from service.core.limits import MAX_TIMEOUT_MS
from service.core.types import Pooling

FeatureBatch = Annotated[list[list[list[float]]] | None, SkipValidation]
TokenBatch = Annotated[list[list[int]] | None, SkipValidation]
TextBatch = Annotated[list[str] | None, SkipValidation]
TimeoutMs = Annotated[
    float | None, Field(gt=0, le=MAX_TIMEOUT_MS, description="Deadline; past it the answer is 504.")
]

# The most tokens a generate body may ask for.
MAX_LENGTH = 100_000

# Examples name the bundled demo models (demo-repository/), so that "Try it out" on /docs works
# against `make serve`.
_FEATURES_EXAMPLE: list[Any] = [[[22.7], [24.4], [25.5], [25.5], [25.8], [24.9]]]


class _OneInput(BaseModel):
    """A body that carries exactly one of its input fields, `inputs_of` (a misspelt or a
    second input is refused by name)."""

    inputs_of: ClassVar[tuple[str, ...]]

    @model_validator(mode="after")
    def _exactly_one(self) -> Self:
        names = self.inputs_of
        given = [name for name in names if getattr(self, name) is not None]
        if len(given) != 1:
            quoted = ", ".join(f"'{name}'" for name in names)
            raise ValueError(f"exactly one of {quoted} is required, got {given or 'none'}")
        return self


def examples(*values: Any) -> ConfigDict:
    """A model's configuration that documents it with `values` (what /docs offers to try)."""
    return ConfigDict(json_schema_extra={"examples": list(values)})


class _Body(BaseModel):
    # NOTE: unknown keys are an error so that a misspelt option is reported, not ignored;
    # strict, so that "stream": "yes" or "max_length": "5" is refused rather than coerced.
    model_config = ConfigDict(extra="forbid", strict=True)


# ---------------------------------------------------------------- errors


class ErrorDetail(BaseModel):
    type: str = Field(description="Error class: InvalidInput, NotFound, Overloaded, …")
    message: str = Field(description="What went wrong, naming the field and the limit.")
    field: str | None = Field(default=None, description="The offending request field, if any.")


class ErrorBody(BaseModel):
    """Error body of rnnserve's API (every status ≥ 400)."""

    model_config = examples(
        {
            "error": {
                "type": "InvalidInput",
                "message": "inputs[2][5]: expected 32 features, got 31",
                "field": "inputs[2][5]",
            }
        }
    )
    error: ErrorDetail


class V2ErrorBody(BaseModel):
    """Error body of the Open Inference Protocol endpoints."""

    model_config = examples({"error": "model 'Surnames' is not known; did you mean 'surnames'?"})
    error: str


# ---------------------------------------------------------------- rnnserve API: inference


class _Inputs(_Body, _OneInput):
    inputs_of = ("inputs", "tokens", "texts")

    inputs: FeatureBatch = Field(
        default=None, description="Feature sequences: [sequence][step][feature] floats."
    )
    tokens: TokenBatch = Field(default=None, description="Token-id sequences: [sequence][step].")
    texts: TextBatch = Field(default=None, description="Text inputs, one string per sequence.")
    timeout_ms: TimeoutMs = None


class EncodeBody(_Inputs):
    """Body of `POST /v1/models/{name}/encode`."""

    model_config = examples(
        {"texts": ["Virtanen", "Rossi"]},
        {"inputs": _FEATURES_EXAMPLE, "pooling": "last"},
        {"tokens": [[5, 17, 3], [8, 2]], "timeout_ms": 500},
    )
    pooling: Pooling | None = Field(
        default=None, description="Pooling over time; default: the model's; none = per step."
    )


class EncodeResponse(BaseModel):
    """Answer of encode: one encoding per sequence (per-step lists for pooling `none`)."""

    model_config = examples(
        {
            "model": "surnames",
            "version": 1,
            "encodings": [[0.12, -0.4, 0.9]],
            "labels": ["Italian"],
            "scores": [[0.01, 0.02, 0.93, 0.04]],
        }
    )
    model: str
    version: int
    encodings: list[list[float]] | list[list[list[float]]]
    labels: list[str] | None = Field(default=None, description="Arg-max label (labelled head).")
    scores: list[list[float]] | None = Field(default=None, description="Head outputs.")


class GenerateBody(_Inputs):
    """Body of `POST /v1/models/{name}/generate` (seq2seq models)."""

    model_config = examples(
        {"texts": ["25 December 2021", "8 de junio de 2004"]},
        {"texts": ["Montag, 2. Oktober 2023"], "max_length": 12, "beam_size": 4},
        {"texts": ["25 December 2021"], "stream": True},
    )
    max_length: int | None = Field(default=None, ge=1, le=MAX_LENGTH, description="Token limit.")
    # NOTE: no bounds here: the engine checks beam_size against the server's configured limit
    # (max_beam_size, default 16), so that every wire refuses the same values with one message.
    beam_size: int = Field(
        default=1,
        description="1 = greedy decoding; at most the server's max_beam_size (default 16).",
    )
    stream: bool = Field(
        default=False,
        description="Answer with server-sent events: `token` events, then one `result` event.",
    )


class GeneratedOutput(BaseModel):
    tokens: list[int]
    text: str | None = None


class GenerateResponse(BaseModel):
    """Answer of generate (also the data of the final `result` event when streaming)."""

    model_config = examples(
        {
            "model": "dates",
            "version": 1,
            "outputs": [{"tokens": [6, 4, 6, 5, 14, 5, 6, 14, 6, 9], "text": "2021-12-25"}],
        }
    )
    model: str
    version: int
    outputs: list[GeneratedOutput]


class TokenEventData(BaseModel):
    """Data of one `token` server-sent event of a streamed generation."""

    index: int = Field(description="Which input sequence the token belongs to.")
    token: int
    text: str | None = None


# ---------------------------------------------------------------- rnnserve API: models, health


class VersionStatus(BaseModel):
    version: int
    state: Literal["LOADING", "READY", "FAILED", "UNLOADING", "UNAVAILABLE"]
    reason: str | None = Field(default=None, description="Why a version failed or is unavailable.")
    load_seconds: float | None = None


class ModelStatus(BaseModel):
    """A model: its versions with their states, and the architecture of its serving version."""

    model_config = examples(
        {
            "name": "elnino",
            "versions": [{"version": 1, "state": "READY", "load_seconds": 0.041}],
            "architecture": {"task": "encode", "encoder": {"cell": "lstm"}},
        }
    )
    name: str
    versions: list[VersionStatus]
    architecture: dict[str, Any]


class ModelList(BaseModel):
    models: list[ModelStatus]


class Health(BaseModel):
    status: Literal["ok", "unavailable"]


class ManagementResult(BaseModel):
    """Answer of a management call: the model's status after the operation."""

    action: Literal["load", "unload", "reload"]
    model: ModelStatus | None = Field(default=None, description="None after a full unload.")


# ---------------------------------------------------------------- Open Inference Protocol (V2)


class V2ServerLive(BaseModel):
    """Answer of `GET /v2/health/live` (the status alone says it too; KServe's SDK reads this)."""

    live: bool


class V2ServerReady(BaseModel):
    """Answer of `GET /v2/health/ready`."""

    ready: bool


class V2ModelReady(BaseModel):
    """Answer of `GET /v2/models/{name}[/versions/{version}]/ready`."""

    name: str
    ready: bool


class V2ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class V2TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int] = Field(description="-1 marks a variable dimension.")


class V2ModelMetadata(BaseModel):
    model_config = examples(
        {
            "name": "elnino",
            "versions": ["1"],
            "platform": "rnnserve",
            "inputs": [
                {"name": "INPUT", "datatype": "FP32", "shape": [-1, -1, 1]},
                {"name": "LENGTHS", "datatype": "INT64", "shape": [-1]},
            ],
            "outputs": [
                {"name": "ENCODING", "datatype": "FP32", "shape": [-1, 32]},
                {"name": "SCORES", "datatype": "FP32", "shape": [-1, 1]},
            ],
            "parameters": {"precision.encoder": "float32", "precision.head": "float32"},
        }
    )
    name: str
    versions: list[str]
    platform: str
    inputs: list[V2TensorMetadata]
    outputs: list[V2TensorMetadata]
    parameters: dict[str, str] = Field(
        default_factory=dict,
        description=(
            "An extension (as MLServer's): `precision.<part>` is the dtype each part of the "
            "model computes in (encoder, head, decoder, attention, output)."
        ),
    )


class V2RequestInput(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] | None = None
    data: Annotated[list[Any] | None, SkipValidation] = Field(
        default=None, description="Row-major flattened (or nested) values; absent in binary mode."
    )


class V2RequestOutput(BaseModel):
    name: str
    parameters: dict[str, Any] | None = None


class V2InferRequest(BaseModel):
    """A V2 inference request (JSON; or JSON header + binary tensors, see the extension)."""

    model_config = examples(
        {
            "inputs": [
                {
                    "name": "TEXT",
                    "shape": [2],
                    "datatype": "BYTES",
                    "data": ["Virtanen", "Rossi"],
                }
            ],
            "outputs": [{"name": "LABELS"}],
        }
    )
    id: str | None = None
    parameters: dict[str, Any] | None = None
    inputs: list[V2RequestInput]
    outputs: list[V2RequestOutput] | None = None


class V2ResponseOutput(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] | None = None
    data: list[Any] | None = None


class V2InferResponse(BaseModel):
    model_name: str
    model_version: str | None = None
    id: str | None = None
    parameters: dict[str, Any] | None = None
    outputs: list[V2ResponseOutput]


class V2RepositoryIndexBody(BaseModel):
    model_config = ConfigDict(strict=True)
    repository_name: str | None = None
    ready: bool | None = Field(default=None, description="true: only READY models.")


class V2RepositoryEntry(BaseModel):
    name: str
    version: str | None = None
    state: str | None = None
    reason: str | None = None


# ---------------------------------------------------------------- streaming sessions


class _SessionBody(BaseModel):
    # NOTE: unknown keys are an error so that a misspelt option is reported, not ignored.
    model_config = ConfigDict(extra="forbid")


class SessionBody(_SessionBody):
    """Body of `POST /v1/models/{name}/sessions` (every field optional)."""

    model_config = examples({"pooling": "mean", "return_state": True})
    pooling: Pooling | None = Field(
        default=None,
        description="Encoding per chunk: over every step so far (last/mean/max; default: the "
        "model's) or this chunk's per-step outputs (none).",
    )
    return_state: bool = Field(
        default=False, description="Answer every chunk with a portable `state_token` too."
    )
    state_token: str | None = Field(
        default=None, description="Resume from a state token returned by an earlier chunk."
    )


class _Chunk(_SessionBody, _OneInput):
    inputs_of = ("inputs", "tokens", "text")

    inputs: Annotated[list[list[float]] | None, SkipValidation] = Field(
        default=None, description="One feature-sequence chunk: [step][feature] floats."
    )
    tokens: Annotated[list[int] | None, SkipValidation] = Field(
        default=None, description="One token-id chunk: [step]."
    )
    text: str | None = Field(default=None, description="One text chunk.")
    timeout_ms: TimeoutMs = None


class ChunkBody(_Chunk):
    """Body of `POST /v1/sessions/{id}/chunks`."""

    model_config = examples({"inputs": [[22.7], [24.4], [25.5]]})


class StreamBody(_Chunk):
    """Body of `POST /v1/models/{name}/stream`: a chunk and the state so far."""

    model_config = examples(
        {"inputs": [[22.7], [24.4]]},
        {"inputs": [[25.5]], "state_token": "<the state_token of the previous answer>"},
    )
    pooling: Pooling | None = Field(default=None, description="As for sessions.")
    state_token: str | None = Field(
        default=None, description="The previous chunk's `state_token`; absent: a new stream."
    )


class SessionResponse(BaseModel):
    """A session: its id, model version, pooling and the steps it has consumed."""

    session_id: str
    model: str
    version: int
    pooling: Pooling
    steps: int


class ChunkResponse(BaseModel):
    """The answer to a chunk."""

    model: str
    version: int
    steps: int = Field(description="Time steps consumed so far, this chunk included.")
    encoding: list[float] | list[list[float]] = Field(
        description="Pooled over every step so far; per step of this chunk for pooling none."
    )
    scores: list[float] | None = Field(default=None, description="Head outputs, if any.")
    label: str | None = Field(default=None, description="Arg-max label of a labelled head.")
    state_token: str | None = Field(
        default=None, description="Opaque portable state (send it back with the next chunk)."
    )
