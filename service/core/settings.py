"""`Settings`: every server option, from `RNNSERVE_*` environment variables (and CLI flags).

The engine reads them, so they live in the core; the process builds them (service/process/
flags.py turns every field into a `--flag`, underscores become dashes, and its description into
the flag's help). Values are checked here, once, with messages that name the setting, so a bad
deployment fails at start-up and not at the first request.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Annotated, Literal

import torch
from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from models.precision import check_cpu_dtype, cpu_capabilities

DType = Literal["float32", "float16", "bfloat16"]

_DEVICE = re.compile(r"^(auto|cpu|cuda|cuda:\d+)$")
_POLICY = re.compile(r"^(latest|latest:[1-9]\d*|all|specific:[1-9]\d*(,[1-9]\d*)*)$")
_MODEL_NAME = re.compile(r"[A-Za-z0-9_.-]+")
# NOTE: a model name is a folder name (DESIGN §2): well under the 255 bytes a file name may have.
MAX_MODEL_NAME_LENGTH = 200
# The rule, as every refusal of a model name states it.
MODEL_NAME_RULE = f"1–{MAX_MODEL_NAME_LENGTH} letters, digits, '-', '_' or '.', and not '.' or '..'"


def is_model_name(name: str) -> bool:
    """1–MAX_MODEL_NAME_LENGTH letters, digits, '-', '_', '.' (no separators), not '.' or '..'."""
    return (
        len(name) <= MAX_MODEL_NAME_LENGTH
        and _MODEL_NAME.fullmatch(name) is not None
        and name not in {".", ".."}
    )


def check_version_policy(policy: str) -> str:
    """Return `policy` if it is `latest`, `latest:N`, `all` or `specific:V1,V2`; else raise."""
    if not _POLICY.match(policy):
        raise ValueError(
            f"version policy {policy!r} must be 'latest', 'latest:N', 'all' or 'specific:1,3'"
        )
    return policy


class Settings(BaseSettings):
    """Server configuration (12-factor): environment variables `RNNSERVE_<FIELD>`, then flags."""

    model_config = SettingsConfigDict(env_prefix="RNNSERVE_", extra="forbid", frozen=True)

    repository: Path = Field(
        default=Path("model-repository"),
        description="Model repository folder: <name>/<version>/config.json + model.safetensors.",
    )
    host: str = Field(default="127.0.0.1", description="Address both servers bind.")
    http_port: int = Field(default=8000, ge=0, le=65535, description="HTTP (REST) port; 0 = any.")
    grpc_port: int = Field(default=8001, ge=0, le=65535, description="gRPC port; 0 = any.")
    device: str = Field(
        default="auto",
        description="Where models run: auto (CUDA when available, else CPU), cpu, cuda, cuda:N.",
    )
    dtype: DType = Field(
        default="float32",
        description=(
            "Precision of models that do not set their own (config.json serving.dtype). On a "
            "GPU float16/bfloat16 apply to every part (prefer float16 for RNNs: cuDNN compacts "
            "bfloat16 RNN weights at every call). On the CPU bfloat16 needs native support "
            "(avx512_bf16 or amx_bf16; Arm: bf16) and runs each part in it only where measured "
            "faster; float16 is refused there (no faster than float32)."
        ),
    )
    cpu_threads: int | None = Field(
        default=None,
        ge=1,
        le=1024,
        description=(
            "torch intra-op threads for CPU compute. Default: one thread less than the cores "
            "(at least 1), so the event loop and front-ends keep a core."
        ),
    )
    models: Annotated[list[str] | None, NoDecode] = Field(
        default=None,
        description="Names of the models to load at start-up (comma separated); default: all.",
    )
    version_policy: str = Field(
        default="latest",
        description="Which versions to load: latest, latest:N, all, or specific:1,3.",
    )
    version_policies: dict[str, str] = Field(
        default_factory=dict,
        description='Per-model overrides of version_policy, e.g. {"dates": "all"} (JSON).',
    )
    strict_readiness: bool = Field(
        default=True,
        description="Ready only when every configured model is READY (else: at least one).",
    )
    log_format: Literal["text", "json"] = Field(default="text", description="Log line format.")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = Field(
        default="INFO", description="Lowest level logged."
    )
    drain_grace_s: float = Field(
        default=30.0,
        ge=0.0,
        description="On SIGTERM: seconds admitted work may take to finish before exit.",
    )
    management_enabled: bool = Field(
        default=False, description="Expose load/unload/reload endpoints."
    )
    management_token: SecretStr | None = Field(
        default=None, description="Bearer token required by management endpoints when set."
    )
    max_body_bytes: int = Field(
        default=64 * 1024 * 1024, ge=1024, description="Largest HTTP request body accepted."
    )
    grpc_max_message_bytes: int = Field(
        default=64 * 1024 * 1024, ge=1024, description="Largest gRPC message (in and out)."
    )
    max_request_values: int | None = Field(
        default=None,
        ge=1024,
        description=(
            "Most values one request may hold that are parsed one by one, counted before "
            "parsing: JSON numbers, strings, lists and objects; protobuf integers, strings, "
            "bytes and messages (packed floats and raw tensor bytes are copied whole and not "
            "counted). Default: max_sequences_per_request × 4096 + 65536, a full request of "
            "one-feature rows of 2048 steps (a list and a number each)."
        ),
    )
    max_answer_bytes: int = Field(
        default=64 * 1024 * 1024,
        ge=1024,
        description=(
            "Largest answer an encode request may ask for, estimated before any compute "
            "(JSON numbers at 16 bytes, binary and gRPC at 4; gRPC answers are also held to "
            "grpc_max_message_bytes)."
        ),
    )
    max_stream_pending: int = Field(
        default=16,
        ge=1,
        le=4096,
        description=(
            "Requests one ModelStreamInfer stream may have running or answered but unread; "
            "the stream reads no more until the client takes an answer."
        ),
    )
    http_header_timeout_s: float = Field(
        default=10.0,
        gt=0.0,
        description=(
            "Seconds a client has to send a request's line and headers, from connecting or "
            "from its first byte on a kept-alive connection; then the connection closes (408)."
        ),
    )
    http_body_timeout_s: float = Field(
        default=60.0,
        gt=0.0,
        description=(
            "Seconds a client has to send a request's whole body once its headers arrived; "
            "then the connection closes (408)."
        ),
    )
    grpc_max_connection_age_s: float = Field(
        default=60.0,
        gt=0.0,
        description=(
            "gRPC connections are ended gracefully (GOAWAY) after this many seconds (give or take "
            "a tenth), so clients reconnect through the Service and spread over new replicas; "
            "inf = never."
        ),
    )
    grpc_max_connection_age_grace_s: float = Field(
        default=math.inf,
        gt=0.0,
        description=(
            "Calls still running on an aged connection may take this long before it is closed "
            "and they fail UNAVAILABLE; inf = streams are never cut by ageing."
        ),
    )
    max_sequences_per_request: int = Field(
        default=1024, ge=1, description="Most sequences one request may carry."
    )
    max_text_length: int = Field(
        default=100_000, ge=1, description="Longest text input, in characters."
    )
    max_beam_size: int = Field(default=16, ge=1, le=256, description="Largest beam_size accepted.")
    max_decode_slots: int = Field(
        default=256,
        ge=1,
        description="Rows (greedy requests + beams) in one model's running decode batch.",
    )
    max_request_decode_slots: int | None = Field(
        default=None,
        ge=1,
        description=(
            "Most rows (sequences × beam_size) one generate request may have in a model's "
            "running decode batch at once; its other sequences wait while later requests go "
            "ahead. Default: half of max_decode_slots (at least one full beam of max_beam_size). "
            "beam_size may not exceed it."
        ),
    )
    max_request_decode_work: int | None = Field(
        default=None,
        ge=1,
        description=(
            "Most decode work one generate request may have running at once, in rows × source "
            "steps (a beam of 4 over a 100-character text is 400); its first sequence always "
            "runs. Bounds how much one request slows every step of the others. Default: the "
            "model's max_batch_size × 128."
        ),
    )
    max_decode_queue: int = Field(
        default=1024,
        ge=1,
        description="Sequences waiting for a decode slot before generate is refused (Overloaded).",
    )
    decode_join_fraction: float = Field(
        default=0.5,
        gt=0.0,
        le=1.0,
        description=(
            "Waiting generate requests are encoded (then join the running decode batch) once "
            "they number this fraction of its requests (grouped: encoding one costs about as "
            "much as many)."
        ),
    )
    decode_max_wait_steps: int = Field(
        default=16,
        ge=0,
        description="…or once the oldest has waited this many decode steps (0: join at once).",
    )
    max_batch_timesteps: int | None = Field(
        default=None,
        ge=1,
        description=(
            "Cost budget of one encode batch in total real time steps; default: "
            "max_batch_size × 128."
        ),
    )
    regroup_fraction: float = Field(
        default=1.0,
        ge=0.0,
        le=4.0,
        description=(
            "After an encode batch completes requests, the next batch may wait (device idle) for "
            "those callers to come back — closed-loop clients — for at most this fraction of "
            "the finished batch's compute time; it starts as soon as they are back. 0 = never "
            "wait (a lone caller never waits either way; see docs/internals.md)."
        ),
    )
    gil_switch_interval_us: float = Field(
        default=15.0,
        ge=5.0,
        le=5000.0,
        description=(
            "Python's thread switch interval in µs (sys.setswitchinterval; Python's default is "
            "5000). The compute thread takes the GIL back after every torch op; a busy event "
            "loop would make it wait up to this long each time."
        ),
    )
    regroup_max_ms: float = Field(
        default=100.0,
        ge=0.0,
        le=10_000.0,
        description="Upper bound of that wait in milliseconds (whatever the compute time).",
    )
    default_timeout_s: float | None = Field(
        default=None, gt=0.0, description="Deadline of requests that set none; empty = none."
    )
    warmup: bool = Field(
        default=True, description="Run one warm-up batch before a version becomes READY."
    )
    # -- streaming sessions (service/core/sessions.py) --
    state_key: SecretStr | None = Field(
        default=None,
        description=(
            "HMAC key of portable state tokens (at least 16 bytes); replicas must share it. "
            "Unset: a random per-process key, so tokens survive no restart and no other replica."
        ),
    )
    state_token_ttl_s: float | None = Field(
        default=None, gt=0.0, description="Lifetime of a state token in seconds; empty = none."
    )
    max_sessions: int = Field(
        default=10_000,
        ge=1,
        description="Server-held streaming sessions open at once; over it new ones are refused.",
    )
    session_idle_timeout_s: float = Field(
        default=300.0,
        gt=0.0,
        description="A server-held session idle this long is closed (its next chunk: expired).",
    )

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if not _DEVICE.match(value):
            raise ValueError(f"device {value!r} must be auto, cpu, cuda or cuda:N")
        return value

    @field_validator("version_policy")
    @classmethod
    def _policy(cls, value: str) -> str:
        return check_version_policy(value)

    @field_validator("version_policies")
    @classmethod
    def _policies(cls, value: dict[str, str]) -> dict[str, str]:
        for name, policy in value.items():
            if not is_model_name(name):
                raise ValueError(
                    f"version_policies: invalid model name {name!r} ({MODEL_NAME_RULE})"
                )
            check_version_policy(policy)
        return value

    @field_validator("models", mode="before")
    @classmethod
    def _split_models(cls, value: object) -> object:
        # NOTE: environment variables and flags give "a,b"; JSON lists pass through.
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("models")
    @classmethod
    def _model_names(cls, value: list[str] | None) -> list[str] | None:
        for name in value or []:
            if not is_model_name(name):
                raise ValueError(f"models: invalid model name {name!r} ({MODEL_NAME_RULE})")
        return value

    @model_validator(mode="after")
    def _dtype_on_cpu(self) -> Settings:
        if self.device == "cpu":
            check_cpu_dtype(self.dtype, cpu_capabilities())
        return self

    @property
    def request_values_limit(self) -> int:
        """`max_request_values`, or its default derived from `max_sequences_per_request`."""
        if self.max_request_values is not None:
            return self.max_request_values
        return self.max_sequences_per_request * 4096 + 65536

    def policy_for(self, model: str) -> str:
        """The version policy of `model` (its override, else the default)."""
        return self.version_policies.get(model, self.version_policy)

    def torch_device(self) -> torch.device:
        """Resolve `device` (auto → cuda when available) and check that it exists."""
        if self.device == "auto":
            device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        else:
            device = torch.device(self.device)
        if device.type == "cuda":
            if not torch.cuda.is_available():
                raise ValueError(f"device {self.device}: CUDA is not available on this machine")
            if device.index is not None and device.index >= torch.cuda.device_count():
                raise ValueError(
                    f"device {self.device}: only {torch.cuda.device_count()} CUDA device(s)"
                )
        if device.type == "cpu":
            check_cpu_dtype(self.dtype, cpu_capabilities())
        return device

    def torch_dtype(self) -> torch.dtype:
        """The torch dtype of `dtype`."""
        return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[
            self.dtype
        ]

    def request_decode_slots(self) -> int:
        """Rows one generate request may hold in a running decode batch."""
        if self.max_request_decode_slots is not None:
            return min(self.max_request_decode_slots, self.max_decode_slots)
        beam = min(self.max_beam_size, self.max_decode_slots)
        return max(beam, self.max_decode_slots // 2)

    def intra_op_threads(self, cores: int) -> int:
        """torch intra-op threads for a machine with `cores` cores."""
        return self.cpu_threads if self.cpu_threads is not None else max(1, cores - 1)
