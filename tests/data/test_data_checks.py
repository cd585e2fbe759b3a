"""Data checks on the real corpus: checksum, the book's vocabulary and token count, non-overlapping splits."""

import numpy as np
from helpers import TIME_MACHINE_SHA1

from rnnlm.batches import split_corpus
from rnnlm.config import TrainConfig
from rnnlm.corpus import read_text, sha1_of
from rnnlm.tokens import build_vocab, encode, prepare_text


def test_corpus_checksum(real_corpus):
    assert sha1_of(real_corpus) == TIME_MACHINE_SHA1
    assert real_corpus.stat().st_size == 178_979


def test_books_char_vocab_and_token_count(book_chars):
    text = book_chars
    vocab = build_vocab(text, "char")
    assert len(vocab) == 28
    assert vocab.tokens[:6] == ["<unk>", " ", "e", "t", "a", "i"]  # the book's printed order
    ids = encode(text, vocab, "char")
    assert len(ids) == 170_580 and ids.dtype == np.uint8
    assert vocab.to_tokens(ids[:13]) == list("the time mach")


def test_word_level_vocab(real_corpus):
    text = prepare_text(read_text(real_corpus), "book", "word")
    vocab = build_vocab(text, "word")
    assert vocab.tokens[1:4] == ["the", "i", "and"]  # D2L 8.3's most frequent words
    ids = encode(text, vocab, "word")
    assert [int((ids == i).sum()) for i in (1, 2, 3)] == [2261, 1267, 1245]  # and their printed counts


def test_default_split_does_not_overlap(book_chars):
    config = TrainConfig()
    ids = encode(book_chars, build_vocab(book_chars, "char"), "char")
    split = split_corpus(ids, config.max_tokens, config.val_tokens, config.min_corpus_tokens())
    assert np.array_equal(split.train, ids[:10_000]) and np.array_equal(split.val, ids[-10_000:])
    assert len(ids) - len(split.val) >= len(split.train)  # validation starts after the last training token
