"""The baseline every throughput ratio divides by: direct model calls of one packed batch.

Issue 4 defines it as "direct packed batch-64 model calls": the whole batch in one packed
nn.RNN/LSTM/GRU call, with no length-aware scheduling. `EncoderModel.forward` itself may run a
faster length-aware path (models.recurrent.run_segmented), so the baseline packs explicitly.
"""

from __future__ import annotations

from torch import Tensor
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from models.config import ModelConfig
from models.encoder import EncoderModel, pool
from models.recurrent import top_layer_final

# The reference workload's model (issues 4–6): a 2-layer LSTM, input 32, hidden 256.
INPUT, HIDDEN, LAYERS = 32, 256, 2


def reference_config() -> ModelConfig:
    """The reference model's config (serving: batches of up to 64, 2 ms delay)."""
    return ModelConfig.model_validate(
        {
            "format": "rnnserve/v1",
            "task": "encode",
            "input": {"type": "features", "size": INPUT},
            "encoder": {"cell": "lstm", "hidden_size": HIDDEN, "num_layers": LAYERS},
            "serving": {"max_batch_size": 64, "max_delay_ms": 2.0, "max_queue_size": 4096},
        }
    )


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
