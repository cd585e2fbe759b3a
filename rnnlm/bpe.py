"""Byte-level BPE subword tokens (GPT-2's scheme) on Hugging Face `tokenizers`: any text in any script, no unknown
token possible, a vocabulary size the user picks.

Text is first seen as its UTF-8 bytes, each byte one of 256 printable characters (`ByteLevel.alphabet()`, all in the
initial vocabulary), then the most frequent adjacent pairs are merged, up to `vocab_size` tokens. Id 0 is `<unk>`
only so that the vocabulary has the shape every rnnlm vocabulary has: encoding never produces it. A tokenizer
travels as its JSON string (`to_json` / `from_json`): in the prepared data's vocab.json, in checkpoints (plain data,
so they still load with `weights_only=True`) and so in the registered model.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from rnnlm.tokens import UNK, Vocab

MIN_VOCAB = 258  # <unk>, the 256 bytes, and at least one merge


def train(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """A byte-level BPE tokenizer of at most `vocab_size` tokens learned from `texts` (streamed: the trainer keeps
    counts of pre-tokens, not the text)."""
    if vocab_size < MIN_VOCAB:
        raise ValueError(f"bpe_vocab_size must be at least {MIN_VOCAB} (<unk> and the 256 bytes), got {vocab_size}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[UNK],  # id 0, as in every rnnlm vocabulary; never produced by encoding
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def vocab_of(tokenizer: Tokenizer) -> Vocab:
    """The tokenizer as an rnnlm vocabulary: its tokens by id, and its JSON to encode and decode with."""
    tokens = [tokenizer.id_to_token(i) for i in range(tokenizer.get_vocab_size())]
    return Vocab(tokens, tokenizer=tokenizer.to_str())


def from_json(text: str) -> Tokenizer:
    """The tokenizer saved by `vocab_of` (its `to_str()`)."""
    return Tokenizer.from_str(text)


def encode(tokenizer: Tokenizer, text: str) -> list[int]:
    """The ids of `text`; `decode` gives the text back exactly."""
    return tokenizer.encode(text, add_special_tokens=False).ids


def encode_batch(tokenizer: Tokenizer, texts: list[str]) -> list[list[int]]:
    """The ids of each text (encoded on the library's threads)."""
    return [encoding.ids for encoding in tokenizer.encode_batch(texts, add_special_tokens=False)]


def decode(tokenizer: Tokenizer, ids: Iterable[int]) -> str:
    """The text of `ids` (bytes that do not end a UTF-8 character read as U+FFFD)."""
    return tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)


def token_bytes(vocab: Vocab) -> np.ndarray:
    """How many bytes of text each token stands for: one a character of a byte-level token; none for `<unk>`."""
    return np.array([0 if token == UNK else len(token) for token in vocab.tokens], dtype=np.int64)
