"""The baseline every throughput ratio divides by: direct model calls of one packed batch.

Issue 4 defines it as "direct packed batch-64 model calls": the whole batch in one packed
nn.RNN/LSTM/GRU call, with no length-aware scheduling. `EncoderModel.forward` itself may run a
faster length-aware path (models.recurrent.run_segmented), so the baseline packs explicitly.
"""

from __future__ import annotations

from torch import Tensor
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from models.encoder import EncoderModel, pool
from models.recurrent import top_layer_final


def packed_encode(model: EncoderModel, inputs: Tensor, lengths: Tensor) -> Tensor:
    """Encodings [N, E] of a padded batch by one packed call (same result as `model(...)`)."""
    x = model.encoder.embedding(inputs) if model.encoder.embedding is not None else inputs
    packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
    out, state = model.encoder.rnn(packed)
    outputs, _ = pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])
    final = top_layer_final(state, model.config.encoder.bidirectional)
    encodings = pool(outputs, lengths, final, model.config.pooling)
    if model.head is not None:
        model.head(encodings)
    return encodings
