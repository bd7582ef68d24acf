"""Char / whitespace tokenizer over a vocab (a JSON array of token strings; id = index).

Input vocabs have "<pad>" = 0 and "<unk>" = 1; target vocabs also hold "<bos>" and "<eos>".
Unknown characters (char) or words (whitespace) map to "<unk>".
"""

from __future__ import annotations

from typing import Literal

PAD = "<pad>"
UNK = "<unk>"
BOS = "<bos>"
EOS = "<eos>"

TokenizerKind = Literal["char", "whitespace"]


class Tokenizer:
    """Maps text to token ids and back; `decode` drops <pad>, <bos> and <eos>."""

    def __init__(self, vocab: list[str], kind: TokenizerKind) -> None:
        if UNK not in vocab:
            raise ValueError(f"the vocab has no {UNK!r} token")
        self.vocab = list(vocab)
        self.kind: TokenizerKind = kind
        self.ids = {token: index for index, token in enumerate(self.vocab)}
        self.unk_id = self.ids[UNK]
        self.pad_id = self.ids.get(PAD)
        self.bos_id = self.ids.get(BOS)
        self.eos_id = self.ids.get(EOS)
        self._dropped = {i for i in (self.pad_id, self.bos_id, self.eos_id) if i is not None}

    def __len__(self) -> int:
        return len(self.vocab)

    def split(self, text: str) -> list[str]:
        """The tokens of `text`: characters, or whitespace-separated words."""
        return list(text) if self.kind == "char" else text.split()

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (unknown tokens → <unk>)."""
        return [self.ids.get(token, self.unk_id) for token in self.split(text)]

    def decode(self, ids: list[int]) -> str:
        """Text of `ids`, without <pad>/<bos>/<eos>; ids outside the vocab read as <unk>."""
        tokens = [
            self.vocab[i] if 0 <= i < len(self.vocab) else UNK
            for i in ids
            if i not in self._dropped
        ]
        return "".join(tokens) if self.kind == "char" else " ".join(tokens)
