"""The `config.json` schema of the rnnserve/v1 checkpoint contract (DESIGN §2).

Public contract: users export their own models to it. Unknown keys are an error so that typos
are caught; cross-field rules (e.g. a seq2seq decoder's hidden size equals the encoder's output
size) are checked here, once, for every loader.
"""

from __future__ import annotations

from typing import Annotated, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

FORMAT: Final = "rnnserve/v1"

CellType = Literal["rnn", "lstm", "gru"]
Pooling = Literal["last", "mean", "max"]
RequestPooling = Literal["last", "mean", "max", "none"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FeaturesInput(_Strict):
    """Dense feature sequences: [time, size] floats per sequence."""

    type: Literal["features"]
    size: int = Field(gt=0, le=65536)


class TokensInput(_Strict):
    """Token-id sequences looked up in an embedding table."""

    type: Literal["tokens"]
    vocab_size: int = Field(gt=0, le=10_000_000)
    embedding_size: int = Field(gt=0, le=65536)


class TextInput(_Strict):
    """Strings tokenized by a char or whitespace tokenizer with a vocab file, then embedded."""

    type: Literal["text"]
    vocab_size: int = Field(gt=0, le=10_000_000)
    embedding_size: int = Field(gt=0, le=65536)
    tokenizer: Literal["char", "whitespace"]
    vocab: str = "vocab.json"


InputSpec = Annotated[FeaturesInput | TokensInput | TextInput, Field(discriminator="type")]


class EncoderSpec(_Strict):
    cell: CellType
    hidden_size: int = Field(gt=0, le=65536)
    num_layers: int = Field(default=1, ge=1, le=64)
    bidirectional: bool = False
    nonlinearity: Literal["tanh", "relu"] | None = None
    reset_after: bool | None = None

    @model_validator(mode="after")
    def _cell_options(self) -> EncoderSpec:
        if self.nonlinearity is not None and self.cell != "rnn":
            raise ValueError(f"encoder.nonlinearity applies to cell 'rnn' only, not '{self.cell}'")
        if self.reset_after is not None and self.cell != "gru":
            raise ValueError(f"encoder.reset_after applies to cell 'gru' only, not '{self.cell}'")
        return self

    @property
    def num_directions(self) -> int:
        return 2 if self.bidirectional else 1

    @property
    def output_size(self) -> int:
        """Size of one step of the top layer's output (hidden × directions)."""
        return self.hidden_size * self.num_directions

    @property
    def activation(self) -> Literal["tanh", "relu"]:
        return self.nonlinearity or "tanh"

    @property
    def gru_reset_after(self) -> bool:
        return True if self.reset_after is None else self.reset_after


class HeadSpec(_Strict):
    """An optional linear layer on the encoding; `labels` names its outputs (classification)."""

    size: int = Field(gt=0, le=1_000_000)
    labels: list[str] | None = None

    @model_validator(mode="after")
    def _labels_match(self) -> HeadSpec:
        if self.labels is not None and len(self.labels) != self.size:
            raise ValueError(
                f"head.labels has {len(self.labels)} entries but head.size is {self.size}"
            )
        return self


class DecoderSpec(_Strict):
    hidden_size: int = Field(gt=0, le=65536)
    num_layers: int = Field(ge=1, le=64)
    embedding_size: int = Field(gt=0, le=65536)
    vocab_size: int = Field(gt=0, le=10_000_000)
    attention: Literal["none", "additive"] = "none"
    attention_size: int | None = Field(default=None, gt=0, le=65536)
    bos_id: int = Field(ge=0)
    eos_id: int = Field(ge=0)
    max_length: int = Field(default=64, ge=1, le=100_000)
    vocab: str | None = None

    @model_validator(mode="after")
    def _consistent(self) -> DecoderSpec:
        for name in ("bos_id", "eos_id"):
            value = getattr(self, name)
            if value >= self.vocab_size:
                raise ValueError(
                    f"decoder.{name} = {value} is outside the vocabulary "
                    f"(vocab_size {self.vocab_size})"
                )
        if self.attention == "additive" and self.attention_size is None:
            raise ValueError(
                "decoder.attention_size is required when decoder.attention is 'additive'"
            )
        if self.attention == "none" and self.attention_size is not None:
            raise ValueError("decoder.attention_size is set but decoder.attention is 'none'")
        return self


class ServingSpec(_Strict):
    """Per-model serving options; the server may cap them further.

    `dtype` (optional) is the precision this model asks for, overriding the server's `--dtype`:
    "float32", "bfloat16" or "float16". Reduced precision is a permission, not an order: on the
    CPU each part of the model runs in bfloat16 only where that was measured faster
    (`models.precision`), float16 never (it is not faster there); on a GPU every part runs in it.
    """

    max_batch_size: int = Field(default=64, ge=1, le=4096)
    max_delay_ms: float = Field(default=2.0, ge=0.0, le=10_000.0)
    max_sequence_length: int = Field(default=2048, ge=1, le=1_000_000)
    max_queue_size: int = Field(default=1024, ge=1, le=1_000_000)
    dtype: Literal["float32", "bfloat16", "float16"] | None = None


class ModelConfig(_Strict):
    """The whole `config.json` of one model version."""

    format: Literal["rnnserve/v1"]
    task: Literal["encode", "seq2seq"]
    input: InputSpec
    encoder: EncoderSpec
    pooling: Pooling = "last"
    head: HeadSpec | None = None
    decoder: DecoderSpec | None = None
    serving: ServingSpec = ServingSpec()

    @model_validator(mode="after")
    def _task_rules(self) -> ModelConfig:
        if self.task == "seq2seq":
            dec = self.decoder
            if dec is None:
                raise ValueError("task 'seq2seq' requires a 'decoder' section")
            if self.head is not None:
                raise ValueError("task 'seq2seq' does not take a 'head' section")
            if dec.hidden_size != self.encoder.output_size:
                raise ValueError(
                    f"decoder.hidden_size ({dec.hidden_size}) must equal the encoder output size "
                    f"(encoder.hidden_size × directions = {self.encoder.output_size})"
                )
            if dec.num_layers != self.encoder.num_layers:
                raise ValueError(
                    f"decoder.num_layers ({dec.num_layers}) must equal encoder.num_layers "
                    f"({self.encoder.num_layers})"
                )
        elif self.decoder is not None:
            raise ValueError("task 'encode' does not take a 'decoder' section")
        return self

    @property
    def encoding_size(self) -> int:
        """Size of a pooled encoding (before the head)."""
        return self.encoder.output_size

    @property
    def input_vocab_path(self) -> str | None:
        return self.input.vocab if isinstance(self.input, TextInput) else None
