"""Fixtures of the speed-path tests: a small character corpus as token ids."""

from __future__ import annotations

import pytest
from helpers import small_text

from rnnlm.batches import as_tensor
from rnnlm.tokens import build_vocab, encode, prepare_text


@pytest.fixture(scope="module")
def char_ids():
    """char_ids(words) -> (vocabulary size, the ids of a made-up text of `words` words at character level)."""

    def make(words: int):
        text = prepare_text(small_text(words), "book", "char")
        vocab = build_vocab(text, "char")
        return len(vocab), as_tensor(encode(text, vocab, "char"))

    return make
