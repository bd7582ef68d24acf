"""Additive (Bahdanau) attention with length masking.

score_j = w_v · tanh(W_q q + W_k k_j); context = Σ_j softmax(score)_j v_j over real steps only.
Shapes: N = rows, S = source steps, A = attention size, E = key/value size, Q = query size.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class AdditiveAttention(nn.Module):
    """Parameters `W_q` [A, Q], `W_k` [A, E], `w_v` [1, A], all without biases (DESIGN §2).

    Computes in its parameters' dtype: queries and keys are cast to it, and the values (the
    encoder memory) must already be in it (`Seq2SeqModel.encode` stores them so).
    """

    def __init__(self, query_size: int, key_size: int, attention_size: int) -> None:
        super().__init__()
        self.W_q = nn.Linear(query_size, attention_size, bias=False)
        self.W_k = nn.Linear(key_size, attention_size, bias=False)
        self.w_v = nn.Linear(attention_size, 1, bias=False)

    def project_keys(self, keys: Tensor) -> Tensor:
        """W_k k_j for every step: keys [N, S, E] → [N, S, A] (computed once per source)."""
        dtype = self.dtype
        projected: Tensor = self.W_k(keys if keys.dtype == dtype else keys.to(dtype))
        return projected

    @property
    def dtype(self) -> torch.dtype:
        """The dtype this attention computes in."""
        return self.W_q.weight.dtype

    def forward(
        self, query: Tensor, projected_keys: Tensor, values: Tensor, mask: Tensor
    ) -> Tensor:
        """query [N, Q], projected_keys [N, S, A], values [N, S, E], mask bool [N, S] → [N, E]."""
        if query.dtype != self.dtype:
            query = query.to(self.dtype)
        features = torch.tanh(self.W_q(query)[:, None, :] + projected_keys)  # [N, S, A]
        scores = self.w_v(features).squeeze(-1)  # [N, S]
        scores = scores.masked_fill(~mask, float("-inf"))
        weights = torch.softmax(scores, dim=-1)  # [N, S]
        return torch.bmm(weights[:, None, :], values).squeeze(1)  # [N, E]
