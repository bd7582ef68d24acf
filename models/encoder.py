"""`SequenceEncoder` (embedding + recurrent layer) and `EncoderModel` (pooling + optional head).

Shapes: N = batch, T = time, F = features, E = encoding size (hidden × directions).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from models.config import EncoderSpec, FeaturesInput, InputSpec, ModelConfig, RequestPooling
from models.precision import PartDtype, Plan, Switch
from models.recurrent import (
    State,
    cast_state,
    last_outputs,
    make_rnn,
    run_rnn,
    run_rnn_outputs,
    top_layer_final,
)


class SequenceEncoder(nn.Module):
    """Embedding (token/text inputs) then the recurrent layer, stored as `rnn` (PyTorch names).

    The recurrent layer computes in the dtype of its `PartDtype` (`set_precision`; float32 until
    then): outputs come back in that dtype, final states in float32.
    """

    def __init__(self, input_spec: InputSpec, spec: EncoderSpec) -> None:
        super().__init__()
        self.spec = spec
        self.embedding: nn.Embedding | None = None
        if isinstance(input_spec, FeaturesInput):
            rnn_input = input_spec.size
        else:
            self.embedding = nn.Embedding(input_spec.vocab_size, input_spec.embedding_size)
            rnn_input = input_spec.embedding_size
        self.rnn = make_rnn(
            spec.cell,
            rnn_input,
            spec.hidden_size,
            spec.num_layers,
            spec.bidirectional,
            spec.activation,
            spec.gru_reset_after,
        )
        self.precision = Switch(self.rnn, PartDtype())

    def set_precision(self, part: PartDtype) -> None:
        """Compute in `part`'s dtype(s) from now on (after the model is placed on its device)."""
        self.precision = Switch(self.rnn, part)

    def forward(
        self, inputs: Tensor, lengths: Tensor, initial_state: State | None = None
    ) -> tuple[Tensor, State]:
        """inputs [N, T, F] float or [N, T] int64, lengths [N] → (outputs [N, T, E] in the
        part's dtype, final state in float32)."""
        rnn, dtype = self.precision.pick(inputs.shape[0])
        x = self._embedded(inputs, dtype)  # [N, T, F]
        initial = None if initial_state is None else cast_state(initial_state, dtype)
        outputs, state = run_rnn(rnn, x, lengths, initial)
        return outputs, cast_state(state, torch.float32)

    def outputs_only(
        self, inputs: Tensor, lengths: Tensor, initial_state: State | None = None
    ) -> Tensor:
        """`forward`'s outputs alone, faster where no final state is needed (`run_rnn_outputs`)."""
        rnn, dtype = self.precision.pick(inputs.shape[0])
        x = self._embedded(inputs, dtype)
        initial = None if initial_state is None else cast_state(initial_state, dtype)
        return run_rnn_outputs(rnn, x, lengths, initial)

    def _embedded(self, inputs: Tensor, dtype: torch.dtype) -> Tensor:
        x = self.embedding(inputs) if self.embedding is not None else inputs
        return x if x.dtype == dtype else x.to(dtype)


@dataclass(frozen=True)
class EncodeOutput:
    """encodings [N, E] (or [N, T, E] for pooling "none"); scores [N, head.size] or None; the
    top layer's final h [N, E]; the final state, unless the call asked for none."""

    encodings: Tensor
    scores: Tensor | None
    final: Tensor
    final_state: State | None


def pool(outputs: Tensor, lengths: Tensor, final: Tensor, pooling: RequestPooling) -> Tensor:
    """Pool top-layer outputs [N, T, E] over each row's real steps; "last" = `final` [N, E].

    The result is float32 whatever the outputs' dtype (a mean accumulates in float32)."""
    if pooling == "last":
        return _float32(final)
    if pooling == "none":
        return _float32(outputs)
    lengths = lengths.to(outputs.device)
    real = torch.arange(outputs.shape[1], device=outputs.device)[None, :] < lengths[:, None]
    if pooling == "mean":
        return outputs.sum(dim=1, dtype=torch.float32) / lengths[:, None].to(torch.float32)
    masked = outputs.masked_fill(~real[:, :, None], float("-inf"))
    return _float32(masked.max(dim=1).values)


def _float32(tensor: Tensor) -> Tensor:
    return tensor if tensor.dtype == torch.float32 else tensor.float()


class EncoderModel(nn.Module):
    """An encode-task model: `encoder` (SequenceEncoder) and optional linear `head`."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = SequenceEncoder(config.input, config.encoder)
        self.head: nn.Linear | None = None
        self.head_precision: Switch | None = None
        if config.head is not None:
            self.head = nn.Linear(config.encoding_size, config.head.size)
            self.head_precision = Switch(self.head, PartDtype())

    def set_precision(self, plan: Plan) -> None:
        """Compute each part in its planned dtype(s) (`models.precision.plan_precision`)."""
        self.encoder.set_precision(plan["encoder"])
        if self.head is not None:
            self.head_precision = Switch(self.head, plan["head"])

    def forward(
        self,
        inputs: Tensor,
        lengths: Tensor,
        pooling: RequestPooling | None = None,
        initial_state: State | None = None,
        return_state: bool = True,
    ) -> EncodeOutput:
        """Encode a padded batch; the head always reads the config's default pooling.

        Scores are softmax probabilities when the head has labels, raw outputs otherwise.
        `return_state=False` leaves `final_state` out, which lets long batches run faster.
        Encodings, scores and states are float32 whatever dtype the parts compute in.
        """
        bidirectional = self.config.encoder.bidirectional
        state: State | None = None
        if return_state:
            outputs, state = self.encoder(inputs, lengths, initial_state)  # [N, T, E]
            final = top_layer_final(state, bidirectional)  # [N, E]
        else:
            outputs = self.encoder.outputs_only(inputs, lengths, initial_state)
            final = _float32(last_outputs(outputs, lengths, bidirectional))
        requested = pooling or self.config.pooling
        encodings = pool(outputs, lengths, final, requested)
        scores: Tensor | None = None
        if self.head_precision is not None:
            default = (
                encodings
                if requested == self.config.pooling
                else pool(outputs, lengths, final, self.config.pooling)
            )
            head, dtype = self.head_precision.pick(default.shape[0])
            scores = _float32(head(default if default.dtype == dtype else default.to(dtype)))
            assert self.config.head is not None
            if self.config.head.labels is not None:
                scores = torch.softmax(scores, dim=-1)
        return EncodeOutput(encodings=encodings, scores=scores, final=final, final_state=state)


def collate(sequences: Sequence[Tensor | np.ndarray]) -> tuple[Tensor, Tensor]:
    """Pad sequences ([T_i, F] float or [T_i] int64; tensors or numpy arrays) into
    (inputs [N, T, ...], lengths [N] CPU int64); equal lengths are stacked without padding."""
    lengths = torch.tensor([s.shape[0] for s in sequences], dtype=torch.int64)
    if all(isinstance(s, np.ndarray) for s in sequences):
        # NOTE: numpy arrays are batched in numpy and cross to torch once: a torch call per
        # row (128 for a batch of streamed chunks) each gives up the GIL and must win it back.
        arrays = [s for s in sequences if isinstance(s, np.ndarray)]
        longest = max(a.shape[0] for a in arrays)
        if all(a.shape[0] == longest for a in arrays):
            # NOTE: np.array stacks equal shapes in C, np.stack runs Python per row.
            return torch.from_numpy(np.array(arrays)), lengths
        padded = np.zeros((len(arrays), longest, *arrays[0].shape[1:]), dtype=arrays[0].dtype)
        for row, a in enumerate(arrays):
            padded[row, : a.shape[0]] = a
        return torch.from_numpy(padded), lengths
    tensors = [torch.from_numpy(s) if isinstance(s, np.ndarray) else s for s in sequences]
    if all(t.shape[0] == tensors[0].shape[0] for t in tensors):
        return torch.stack(tensors), lengths
    return nn.utils.rnn.pad_sequence(tensors, batch_first=True), lengths
