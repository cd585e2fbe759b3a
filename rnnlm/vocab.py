"""Tokenization and the vocabulary, as D2L defines them, working on whole arrays rather than Python lists.

The vocabulary is `<unk>` at index 0, then reserved tokens, then every token seen at least `min_freq` times by
descending frequency; ties keep the order of first appearance (what the book's stable sort over a Counter gives),
so indices match the book's exactly.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np

from rnnlm.corpus import preprocess

UNK = "<unk>"


class Vocab:
    """Token <-> index mapping. `tokens[0]` is always `<unk>`; unknown tokens map to 0."""

    def __init__(self, tokens: list[str]):
        if not tokens or tokens[0] != UNK:
            raise ValueError(f"a vocabulary starts with {UNK!r}")
        if len(set(tokens)) != len(tokens):
            raise ValueError("a vocabulary cannot repeat a token")
        self.tokens = list(tokens)
        self.index = {token: i for i, token in enumerate(self.tokens)}

    def __len__(self) -> int:
        return len(self.tokens)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocab) and self.tokens == other.tokens

    def to_ids(self, tokens: list[str]) -> list[int]:
        """Indices of tokens; unknown ones become 0 (`<unk>`)."""
        return [self.index.get(token, 0) for token in tokens]

    def to_tokens(self, ids) -> list[str]:
        """Tokens of indices."""
        return [self.tokens[int(i)] for i in ids]

    def unknown(self, tokens: list[str]) -> list[str]:
        """The distinct tokens not in the vocabulary, in order of appearance."""
        return list(dict.fromkeys(t for t in tokens if t not in self.index))

    def save(self, path: Path) -> None:
        """Write the vocabulary as JSON (`{"tokens": [...]}`)."""
        Path(path).write_text(json.dumps({"tokens": self.tokens}, ensure_ascii=False))

    @classmethod
    def load(cls, path: Path) -> Vocab:
        """Read a vocabulary written by `save`."""
        return cls(json.loads(Path(path).read_text())["tokens"])


def split_tokens(text: str, tokenization: str) -> list[str]:
    """Split prepared text into tokens: characters, or whitespace-separated words."""
    if tokenization == "char":
        return list(text)
    if tokenization == "word":
        return text.split()
    raise ValueError(f"unknown tokenization {tokenization!r}; use 'char' or 'word'")


def join_tokens(tokens: list[str], tokenization: str) -> str:
    """Inverse of `split_tokens` up to whitespace."""
    return "".join(tokens) if tokenization == "char" else " ".join(tokens)


def prepare_text(raw: str, preprocess_mode: str, tokenization: str) -> str:
    """Preprocess raw text for a tokenization. The book joins lines with nothing between them at character level;
    words must not merge across a line break, so word level keeps a space there."""
    if preprocess_mode == "book" and tokenization == "word":
        return " ".join(preprocess(line, "book") for line in raw.split("\n"))
    return preprocess(raw, preprocess_mode)


def build_vocab(text: str, tokenization: str, min_freq: int = 0, reserved: list[str] | None = None) -> Vocab:
    """The book's vocabulary over prepared text."""
    counts = _char_counts(text) if tokenization == "char" else Counter(split_tokens(text, "word"))
    return Vocab(rank_counts(counts, min_freq, reserved))


def rank_counts(counts: dict[str, int], min_freq: int = 0, reserved: list[str] | None = None) -> list[str]:
    """The book's token order from counts listed in order of first appearance: `<unk>`, reserved tokens, then by
    descending frequency (a stable sort: ties keep first appearance), stopping below `min_freq`."""
    ranked = sorted(counts.items(), key=lambda kv: kv[1], reverse=True)
    tokens = [UNK] + [t for t in (reserved or []) if t != UNK]
    seen = set(tokens)
    for token, freq in ranked:
        if freq < min_freq:
            break
        if token not in seen:
            tokens.append(token)
            seen.add(token)
    return tokens


def _char_counts(text: str) -> dict[str, int]:
    """Character counts in order of first appearance, via numpy for ASCII text (the book's case) and Counter else."""
    if not text.isascii():
        return dict(Counter(text))
    counts = np.bincount(np.frombuffer(text.encode("ascii"), dtype=np.uint8), minlength=128)
    present = [chr(c) for c in np.flatnonzero(counts)]
    present.sort(key=text.index)
    return {ch: int(counts[ord(ch)]) for ch in present}


def id_dtype(vocab_size: int) -> np.dtype:
    """Smallest integer type that holds every index and that torch handles fully (torch's uint16 is partial)."""
    return np.dtype(np.uint8 if vocab_size <= 256 else np.int16 if vocab_size <= 32_768 else np.int32)


def encode(text: str, vocab: Vocab, tokenization: str) -> np.ndarray:
    """Prepared text as one compact integer array of vocabulary indices."""
    dtype = id_dtype(len(vocab))
    if tokenization == "char" and text.isascii():
        lut = np.zeros(128, dtype=dtype)  # characters not in the vocab stay 0 = <unk>
        for i, token in enumerate(vocab.tokens):
            if len(token) == 1 and token.isascii():
                lut[ord(token)] = i
        return lut[np.frombuffer(text.encode("ascii"), dtype=np.uint8)]
    return np.asarray(vocab.to_ids(split_tokens(text, tokenization)), dtype=dtype)
