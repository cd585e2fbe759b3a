"""Library functions against the book's definitions: vocab, splits, minibatch iterators."""

import numpy as np
import pytest
import torch

from rnnlm.batches import DataError, eval_batches, num_batches, random_batches, sequential_batches, split_corpus
from rnnlm.tokens import UNK, Vocab, build_vocab, encode, prepare_text


def test_vocab_orders_by_frequency_ties_by_first_appearance():
    vocab = build_vocab("abbcccdd", "char")
    assert vocab.tokens == [UNK, "c", "b", "d", "a"]  # b and d tie at 2: b came first


def test_vocab_min_freq_and_reserved_tokens():
    vocab = build_vocab("a b b c c c", "word", min_freq=2, reserved=["<pad>"])
    assert vocab.tokens == [UNK, "<pad>", "c", "b"]
    assert vocab.to_ids(["c", "a", "zzz"]) == [2, 0, 0]


def test_vocab_json_roundtrip(tmp_path):
    vocab = build_vocab("héllo wörld", "char")  # non-ASCII takes the general path
    vocab.save(tmp_path / "v.json")
    assert Vocab.load(tmp_path / "v.json") == vocab


def test_word_tokens_do_not_merge_across_lines():
    text = prepare_text("The end\nNext line.\n", "book", "word")
    assert text.split() == ["the", "end", "next", "line"]


def test_encode_is_compact_and_matches_vocab():
    text = "hello world"
    vocab = build_vocab(text, "char")
    ids = encode(text, vocab, "char")
    assert ids.dtype == np.uint8 and vocab.to_tokens(ids) == list(text)


def test_split_uses_what_there_is_and_says_so():
    ids = np.arange(1000)
    split = split_corpus(ids, max_tokens=5000, val_tokens=100, min_train=50)
    assert len(split.train) == 900 and "only 900" in split.note
    assert np.intersect1d(split.train, split.val).size == 0


def test_corpus_shorter_than_one_minibatch_gives_the_minimum():
    with pytest.raises(DataError, match="fewer than the 1,156 needed"):
        split_corpus(np.arange(500), max_tokens=-1, val_tokens=0, min_train=32 * 35 + 35 + 1)


def _corpus(n: int = 1000) -> torch.Tensor:
    return torch.arange(n)  # token i is i, so windows and shifts are easy to check


def test_sequential_batches_are_contiguous_across_batches():
    gen = torch.Generator().manual_seed(0)
    batches = list(sequential_batches(_corpus(), batch_size=4, num_steps=5, generator=gen))
    assert all(x.shape == (4, 5) and x.dtype == torch.int64 for x, _ in batches)
    for (x0, _), (x1, _) in zip(batches[:-1], batches[1:], strict=True):
        assert torch.equal(x1[:, 0], x0[:, -1] + 1)  # each row continues where it stopped
    for x, y in batches:
        assert torch.equal(y, x + 1)  # targets are inputs shifted by one token


def test_random_batches_are_windows_of_the_corpus():
    gen = torch.Generator().manual_seed(0)
    batches = list(random_batches(_corpus(), batch_size=4, num_steps=5, generator=gen))
    assert len(batches) in (num_batches(1000, 4, 5, True), num_batches(1000, 4, 5, True) - 1)
    for x, y in batches:
        assert torch.equal(x[:, 1:] - x[:, :-1], torch.ones(4, 4, dtype=torch.int64))
        assert torch.equal(y, x + 1)
    starts = torch.cat([x[:, 0] for x, _ in batches])
    assert len(set(starts.tolist())) == len(starts)  # no subsequence served twice in an epoch


def test_epoch_offsets_are_random_and_seeded():
    def first_tokens(seed):
        gen = torch.Generator().manual_seed(seed)
        return [int(next(sequential_batches(_corpus(), 4, 5, gen))[0][0, 0]) for _ in range(8)]

    assert first_tokens(1) == first_tokens(1)
    assert len(set(first_tokens(1))) > 1


def test_eval_batches_take_each_token_once_but_the_tail_that_does_not_fill_a_row():
    corpus = torch.arange(103)
    batches = list(eval_batches(corpus, batch_size=4, num_steps=5))
    seen = torch.cat([x.reshape(-1) for x, _ in batches])
    assert sorted(seen.tolist()) == list(range(100))  # 4 rows x 25 columns: 100 and 101 dropped, 102 only a target
    assert all(torch.equal(y, x + 1) for x, y in batches)  # each input's target is the token after it
