"""Beam search for one request over the log-probabilities a decoder gives it (no model here).

Offline `Seq2SeqModel.generate` (`models.seq2seq.beam_decode`) and the server's decode scheduler
both drive it, so they rank and stop alike.

Length normalisation (beam search): a finished hypothesis is ranked by
    score / len ** length_penalty
where score is the sum of its token log-probabilities and len counts its generated tokens,
<eos> included. length_penalty = 1.0 (the default) ranks by mean log-probability per token;
0.0 ranks by the raw sum (which favours short outputs). Search stops early, as HF's
`early_stopping=True`: once `beam_size` hypotheses have finished, the rest are dropped.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Hypothesis:
    tokens: list[int]
    score: float  # sum of log-probabilities, <eos> included when finished


class BeamSearch:
    """Beam search for one request. Starts from one row (the <bos> step).

    Each call to `step(log_probs [rows, V])` extends the live hypotheses (one per row) and returns
    `(parent_rows int64 [K], tokens int64 [K])`: the rows to keep (in order) and the token each
    feeds to the next step. K = 0 once `done`. `best()` is the highest-ranked finished output.
    """

    def __init__(
        self, beam_size: int, eos_id: int, max_length: int, length_penalty: float = 1.0
    ) -> None:
        if beam_size < 1:
            raise ValueError(f"beam_size must be ≥ 1, got {beam_size}")
        if max_length < 1:
            raise ValueError(f"max_length must be ≥ 1, got {max_length}")
        self.beam_size = beam_size
        self.eos_id = eos_id
        self.max_length = max_length
        self.length_penalty = length_penalty
        self.live: list[Hypothesis] = [Hypothesis([], 0.0)]
        self.finished: list[Hypothesis] = []

    @property
    def done(self) -> bool:
        return not self.live

    def rank(self, hypothesis: Hypothesis) -> float:
        """The normalised score used to pick the best finished hypothesis."""
        length = len(hypothesis.tokens) + 1  # NOTE: +1 counts <eos>; at max_length none was emitted
        if len(hypothesis.tokens) >= self.max_length:
            length -= 1
        return hypothesis.score / max(1, length) ** self.length_penalty

    def step(self, log_probs: Tensor) -> tuple[Tensor, Tensor]:
        """Extend the live hypotheses with log_probs [rows, V]; return (parent_rows, tokens)."""
        if len(self.live) != log_probs.shape[0]:
            raise ValueError(
                f"expected {len(self.live)} rows of log-probs, got {log_probs.shape[0]}"
            )
        vocab = log_probs.shape[1]
        base = torch.tensor([h.score for h in self.live], dtype=torch.float64)
        totals = (base[:, None] + log_probs.detach().to("cpu", torch.float64)).flatten()
        count = min(2 * self.beam_size, totals.numel())
        values, indices = torch.topk(totals, count)
        parents: list[int] = []
        tokens: list[int] = []
        survivors: list[Hypothesis] = []
        for value, index in zip(values.tolist(), indices.tolist(), strict=True):
            row, token = divmod(index, vocab)
            hypothesis = self.live[row]
            if token == self.eos_id:
                self.finished.append(Hypothesis(hypothesis.tokens, value))
            else:
                extended = Hypothesis([*hypothesis.tokens, token], value)
                if len(extended.tokens) >= self.max_length:
                    self.finished.append(extended)
                else:
                    survivors.append(extended)
                    parents.append(row)
                    tokens.append(token)
            if len(self.finished) >= self.beam_size or len(survivors) == self.beam_size:
                break
        if len(self.finished) >= self.beam_size:
            survivors, parents, tokens = [], [], []
        self.live = survivors
        return torch.tensor(parents, dtype=torch.int64), torch.tensor(tokens, dtype=torch.int64)

    def best(self) -> list[int]:
        """Tokens of the best finished hypothesis (<eos> not included)."""
        if not self.finished:
            raise RuntimeError("beam search has not finished")
        return max(self.finished, key=self.rank).tokens
