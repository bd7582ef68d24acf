"""`Seq2SeqModel`: encode → decoder initial state → one decoder step at a time (DESIGN §2), and
the offline searches that drive it (`greedy_decode`, `beam_decode`).

Shapes: N = rows, S = source steps, E = encoder output size (= decoder hidden), V = target vocab,
L = layers. The decoder's input at each step is concat(embedding(previous token), context).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.attention import AdditiveAttention
from models.beam_search import BeamSearch
from models.config import DecoderSpec, ModelConfig
from models.encoder import SequenceEncoder
from models.precision import PartDtype, Plan, Switch
from models.recurrent import (
    State,
    cast_state,
    cat_states,
    make_rnn,
    select_state,
    step_rnn,
    top_layer_final,
)


@dataclass(frozen=True)
class DecoderState:
    """The decoding state of N independent rows.

    hidden: decoder state [L, N, E] (LSTM: (h, c)), in the dtype of the step that made it
    (float32 from `encode`). context: [N, E], the fixed context (no attention). memory [N, S, E],
    keys [N, S, A] (= W_k memory), both in the attention's dtype, and mask bool [N, S] (real
    source steps) are set with attention only.
    """

    hidden: State
    context: Tensor | None = None
    memory: Tensor | None = None
    keys: Tensor | None = None
    mask: Tensor | None = None

    @property
    def rows(self) -> int:
        h = self.hidden[0] if isinstance(self.hidden, tuple) else self.hidden
        return int(h.shape[1])

    @property
    def device(self) -> torch.device:
        h = self.hidden[0] if isinstance(self.hidden, tuple) else self.hidden
        return h.device

    def select(self, rows: Tensor) -> DecoderState:
        """Rows `rows` (int64 [K]) of this state, in that order (beams, dropping finished rows)."""
        rows = rows.to(self.device)
        return DecoderState(
            hidden=select_state(self.hidden, rows),
            context=None if self.context is None else self.context.index_select(0, rows),
            memory=None if self.memory is None else self.memory.index_select(0, rows),
            keys=None if self.keys is None else self.keys.index_select(0, rows),
            mask=None if self.mask is None else self.mask.index_select(0, rows),
        )

    @staticmethod
    def cat(states: list[DecoderState]) -> DecoderState:
        """Join the rows of several states; encoder memory is padded to the longest source."""
        if not states:
            raise ValueError("DecoderState.cat needs at least one state")
        first = states[0]
        hidden = cat_states([s.hidden for s in states])
        context = None if first.context is None else torch.cat([_req(s.context) for s in states])
        if first.memory is None:
            return DecoderState(hidden=hidden, context=context)
        longest = max(_req(s.memory).shape[1] for s in states)

        def padded(t: Tensor) -> Tensor:
            # NOTE: only shorter states are padded: padding by 0 would still copy (the running
            # batch's memory bank, at every join of the decode scheduler).
            if t.shape[1] == longest:
                return t
            if t.dim() == 2:  # the mask [N, S]: pad with False so padding is never attended
                return F.pad(t, (0, longest - t.shape[1]))
            return F.pad(t, (0, 0, 0, longest - t.shape[1]))

        return DecoderState(
            hidden=hidden,
            context=context,
            memory=torch.cat([padded(_req(s.memory)) for s in states]),
            keys=torch.cat([padded(_req(s.keys)) for s in states]),
            mask=torch.cat([padded(_req(s.mask)) for s in states]),
        )


def _req(t: Tensor | None) -> Tensor:
    assert t is not None
    return t


class Decoder(nn.Module):
    """`embedding`, `rnn` (same cell as the encoder), optional `attention`, `output` (logits).

    The embedding stays float32; `rnn` (the part "decoder"), `attention` and `output` compute in
    the dtypes `Seq2SeqModel.set_precision` gives them (float32 until then).
    """

    def __init__(self, config: ModelConfig, spec: DecoderSpec) -> None:
        super().__init__()
        enc = config.encoder
        context_size = enc.output_size
        self.embedding = nn.Embedding(spec.vocab_size, spec.embedding_size)
        self.rnn = make_rnn(
            enc.cell,
            spec.embedding_size + context_size,
            spec.hidden_size,
            spec.num_layers,
            False,
            enc.activation,
            enc.gru_reset_after,
        )
        self.attention: AdditiveAttention | None = None
        if spec.attention == "additive":
            assert spec.attention_size is not None
            self.attention = AdditiveAttention(spec.hidden_size, context_size, spec.attention_size)
        self.output = nn.Linear(spec.hidden_size, spec.vocab_size)
        self.rnn_precision = Switch(self.rnn, PartDtype())
        self.output_precision = Switch(self.output, PartDtype())


class Seq2SeqModel(nn.Module):
    """Encoder-decoder: `encoder` (SequenceEncoder) and `decoder` (Decoder)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if config.decoder is None:
            raise ValueError("a seq2seq model needs a decoder section")
        self.config = config
        self.decoder_spec: DecoderSpec = config.decoder
        self.encoder = SequenceEncoder(config.input, config.encoder)
        self.decoder = Decoder(config, config.decoder)

    def set_precision(self, plan: Plan) -> None:
        """Compute each part in its planned dtype(s) (`models.precision.plan_precision`)."""
        self.encoder.set_precision(plan["encoder"])
        self.decoder.rnn_precision = Switch(self.decoder.rnn, plan["decoder"])
        self.decoder.output_precision = Switch(self.decoder.output, plan["output"])
        if self.decoder.attention is not None:
            attention = plan["attention"]
            if attention.switches:
                raise ValueError("the attention's dtype cannot switch by rows (its memory is kept)")
            self.decoder.attention.to(attention.reduced)

    def encode(self, inputs: Tensor, lengths: Tensor) -> DecoderState:
        """Run the encoder; the decoder starts from its final state, layer by layer."""
        enc = self.config.encoder
        outputs, final = self.encoder(inputs, lengths)  # [N, S, E]
        context = top_layer_final(final, enc.bidirectional)  # [N, E]
        hidden = _merge_directions(final, enc.num_layers, enc.num_directions)
        if self.decoder.attention is None:
            return DecoderState(hidden=hidden, context=context)
        steps = torch.arange(outputs.shape[1], device=outputs.device)
        mask = steps[None, :] < lengths.to(outputs.device)[:, None]  # [N, S]
        dtype = self.decoder.attention.dtype
        memory = outputs if outputs.dtype == dtype else outputs.to(dtype)
        keys = self.decoder.attention.project_keys(memory)  # [N, S, A]
        return DecoderState(hidden=hidden, memory=memory, keys=keys, mask=mask)

    def step(self, state: DecoderState, tokens: Tensor) -> tuple[Tensor, DecoderState]:
        """One decoder step for N rows: tokens int64 [N] → (log_probs float32 [N, V], new state)."""
        dec = self.decoder
        embedded = dec.embedding(tokens.to(state.device))  # [N, Emb]
        if dec.attention is None:
            context = _req(state.context)
        else:
            h = state.hidden[0] if isinstance(state.hidden, tuple) else state.hidden
            context = dec.attention(h[-1], _req(state.keys), _req(state.memory), _req(state.mask))
        rows = embedded.shape[0]
        rnn, dtype = dec.rnn_precision.pick(rows)
        x = torch.cat([embedded.to(dtype), context.to(dtype)], dim=-1)  # [N, Emb + E]
        output, hidden = step_rnn(rnn, x, cast_state(state.hidden, dtype))  # [N, E]
        projection, dtype = dec.output_precision.pick(rows)
        logits = projection(output if output.dtype == dtype else output.to(dtype))  # [N, V]
        log_probs = torch.log_softmax(logits.float(), dim=-1)
        return log_probs, replace(state, hidden=hidden)

    def generate(
        self,
        inputs: Tensor,
        lengths: Tensor,
        max_length: int | None = None,
        beam_size: int = 1,
        length_penalty: float = 1.0,
    ) -> list[list[int]]:
        """Decode every source (greedy when beam_size = 1); outputs exclude <bos>/<eos>."""
        limit = max_length if max_length is not None else self.decoder_spec.max_length
        state = self.encode(inputs, lengths)
        if beam_size == 1:
            return greedy_decode(self, state, limit)
        return beam_decode(self, state, beam_size, limit, length_penalty)


def greedy_decode(model: Seq2SeqModel, state: DecoderState, max_length: int) -> list[list[int]]:
    """Arg-max decoding of every row of `state` together; a row stops at <eos> or max_length."""
    spec = model.decoder_spec
    rows = state.rows
    tokens = torch.full((rows,), spec.bos_id, dtype=torch.int64, device=state.device)
    outputs: list[list[int]] = [[] for _ in range(rows)]
    active = list(range(rows))  # request index of each live row
    for _ in range(max_length):
        log_probs, state = model.step(state, tokens)
        chosen = log_probs.argmax(dim=-1)
        keep: list[int] = []
        for position, token in enumerate(chosen.tolist()):
            if token == spec.eos_id:
                continue
            outputs[active[position]].append(token)
            keep.append(position)
        if not keep:
            break
        if len(keep) < len(active):
            index = torch.tensor(keep, dtype=torch.int64, device=state.device)
            state = state.select(index)
            chosen = chosen.index_select(0, index)
            active = [active[p] for p in keep]
        tokens = chosen
    return outputs


def beam_decode(
    model: Seq2SeqModel,
    state: DecoderState,
    beam_size: int,
    max_length: int,
    length_penalty: float = 1.0,
) -> list[list[int]]:
    """Beam search for every row of `state` (one request per row), all stepped together."""
    spec = model.decoder_spec
    searches = [
        BeamSearch(beam_size, spec.eos_id, max_length, length_penalty) for _ in range(state.rows)
    ]
    owners = list(range(state.rows))  # which search each of the current rows belongs to
    counts = [1] * state.rows
    tokens = torch.full((state.rows,), spec.bos_id, dtype=torch.int64, device=state.device)
    while owners:
        log_probs, state = model.step(state, tokens)
        # NOTE: one device-to-host copy per step for all requests, not one per request.
        log_probs = log_probs.detach().to("cpu", torch.float64)
        rows: list[Tensor] = []
        next_tokens: list[Tensor] = []
        next_owners: list[int] = []
        next_counts: list[int] = []
        offset = 0
        for owner, count in zip(owners, counts, strict=True):
            parents, chosen = searches[owner].step(log_probs[offset : offset + count])
            if len(parents) > 0:
                rows.append(parents + offset)
                next_tokens.append(chosen)
                next_owners.append(owner)
                next_counts.append(len(parents))
            offset += count
        owners, counts = next_owners, next_counts
        if owners:
            state = state.select(torch.cat(rows).to(state.device))
            tokens = torch.cat(next_tokens).to(state.device)
    return [search.best() for search in searches]


def _merge_directions(state: State, layers: int, directions: int) -> State:
    """Encoder state [L*D, N, H] → decoder state [L, N, D*H] (forward then backward)."""

    def merge(t: Tensor) -> Tensor:
        n, h = t.shape[1], t.shape[2]
        return (
            t.view(layers, directions, n, h)
            .permute(0, 2, 1, 3)
            .reshape(layers, n, directions * h)
            .contiguous()
        )

    if isinstance(state, tuple):
        return (merge(state[0]), merge(state[1]))
    return merge(state)
