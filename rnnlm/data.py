"""Data preparation, the first stage of a run: fetch the corpus, check it against the options, and prepare it once
(preprocess, tokenize, build the vocab, split) into a cache keyed by its content and the data settings.

    from rnnlm.config import TrainConfig
    from rnnlm import data
    cfg = TrainConfig(corpus="../shared/data/timemachine.txt")
    prepared = data.prepare_data(data.fetch(cfg), cfg)
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from rnnlm import paths
from rnnlm.atomic import replacing
from rnnlm.batches import DataError, require_training_tokens, split_corpus
from rnnlm.config import TrainConfig
from rnnlm.corpus import check_local, is_url, sha1_of
from rnnlm.download import fetch_corpus
from rnnlm.spans import HeldOutBytes, held_out_spans, span_bytes, tail_tokens, token_bytes, tokenize_spans
from rnnlm.tokens import Vocab, tokenize_file


def fetch(config: TrainConfig) -> Path:
    """The verified local corpus file for `config` (downloaded into the cache when it is a URL, reused from there
    when its sha1 matches or, with none expected, its size and time are the download's)."""
    return fetch_corpus(
        config.corpus,
        paths.cache_dir(config.cache_dir),
        sha1=config.expected_sha1(),
        max_bytes=int(config.max_download_mb * 2**20),
        timeout=(config.download_timeout, config.download_timeout),
        deadline=config.download_deadline,
    )


def preflight(config: TrainConfig) -> None:
    """The checks that need no download and no tokenizing, for a local corpus: it is a readable file (CorpusError
    otherwise) and can hold the tokens `config` holds out (DataError naming the options otherwise). A URL's corpus is
    checked when it arrives, before any training."""
    if is_url(config.corpus):
        return
    size = check_local(config.corpus).stat().st_size
    unit = config.held_out if config.held_out != "tokens" else f"{config.tokenization} tokens"
    # a word and the space after it: 2 bytes; a BPE token or a line: 1 byte at least
    most = (size + 1) // 2 if unit == "word tokens" else size
    held_out = config.val_tokens + config.test_tokens
    if held_out and held_out >= most:
        raise DataError(
            f"val_tokens={config.val_tokens:,} and test_tokens={config.test_tokens:,} hold out more tokens than "
            f"{config.corpus} ({size:,} bytes, at most {most:,} {unit}) can have; lower "
            f"--val_tokens or --test_tokens"
        )


# --- prepared data ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PreparedData:
    """Paths of a prepared corpus (vocab JSON, train, validation and test token arrays) and what it holds."""

    folder: str
    corpus_sha1: str
    vocab_size: int
    num_tokens: int
    train_tokens: int
    val_tokens: int
    note: str = ""
    test_tokens: int = 0
    held_out_span: str = ""  # which text is held out: its byte offsets in the corpus, or its count of tokens
    val_bytes: int = 0  # the held-out text's UTF-8 bytes after preprocessing (`rnnlm.spans.HeldOutBytes`)
    val_unk_bytes: int = 0
    test_bytes: int = 0
    test_unk_bytes: int = 0
    reused: bool = field(default=False, compare=False)  # found in the cache, not prepared by this call

    # the files a preparation writes, info.json last
    vocab_path = property(lambda self: Path(self.folder) / "vocab.json")
    train_path = property(lambda self: Path(self.folder) / "train.npy")
    val_path = property(lambda self: Path(self.folder) / "val.npy")
    test_path = property(lambda self: Path(self.folder) / "test.npy")
    info_path = property(lambda self: Path(self.folder) / "info.json")

    def load(self) -> tuple[Vocab, np.ndarray, np.ndarray]:
        """Vocab, training and validation tokens, memory-mapped so their size does not count against the process."""
        return Vocab.load(self.vocab_path), *(np.load(p, mmap_mode="r") for p in (self.train_path, self.val_path))

    def load_test(self) -> np.ndarray:
        """The test tokens (empty without a test split), memory-mapped."""
        return np.load(self.test_path, mmap_mode="r")

    def held_out_bytes(self, split: str) -> HeldOutBytes:
        """The bytes of the 'val' or 'test' text, and of its tokens mapped to `<unk>`."""
        return HeldOutBytes(getattr(self, f"{split}_bytes"), getattr(self, f"{split}_unk_bytes"))


def prepared_folder(corpus_sha1: str, config: TrainConfig) -> Path:
    """Where the prepared form of a corpus goes: keyed by its content and every setting that shapes the tokens."""
    settings = {name: getattr(config, name) for name in TrainConfig.fields_with_role("data")}
    return paths.cache_dir(config.cache_dir) / "prepared" / paths.key_of(corpus_sha1, settings)


def prepare_data(corpus_path: Path, config: TrainConfig) -> PreparedData:
    """Preprocess, tokenize, build the vocab and split `corpus_path` per `config`, into the cache; a corpus prepared
    with the same settings before is read back from there.

    Raises DataError (with what to change) for a corpus that is empty after preprocessing or too short for one
    minibatch, before any training starts. Runs that prepare the same corpus at once (a sweep's members) each work
    in their own temporary files and rename the results into place, so that none reads another's half-written file
    and a run that has the previous arrays memory-mapped keeps them whole.
    """
    corpus_sha1 = sha1_of(corpus_path)
    folder, least = prepared_folder(corpus_sha1, config), config.min_corpus_tokens()
    if (data := _read_prepared(folder)) is not None:
        require_training_tokens(data.train_tokens, least)  # batch and steps may differ from the preparing run's
    else:
        data = _prepare(corpus_path, config, folder, corpus_sha1, least)
    return _fits_vocab(data, config)


def _prepare(corpus_path: Path, config: TrainConfig, folder: Path, corpus_sha1: str, least: int) -> PreparedData:
    """Tokenize, build the vocab and split, into `folder` (`prepare_data` without the cache)."""
    with replacing(folder / "ids.npy", keep=False) as ids_path:  # streamed in chunks: memory does not grow
        if config.held_out == "tokens":
            vocab, ids = tokenize_file(corpus_path, ids_path, config.preprocess, config.tokenization, config.min_freq)
            val_count, test_count, spans = config.val_tokens, config.test_tokens, None
        else:
            spans = held_out_spans(corpus_path, config.held_out, config.val_tokens, config.test_tokens)
            vocab, ids, (_, val_count, test_count) = tokenize_spans(
                corpus_path, ids_path, spans, config.preprocess, config.tokenization, config.min_freq,
                config.bpe_vocab_size,
            )  # fmt: skip
        if not any(token.strip() for token in vocab.tokens[1:]):
            raise DataError(f"{corpus_path} holds no tokens after '{config.preprocess}' preprocessing; check the file")
        split = split_corpus(ids, config.max_tokens, val_count, least, test_count)
        sizes = (len(vocab), len(ids), len(split.train), len(split.val))
        held_out = _held_out(corpus_path, config, vocab, spans, split)
        data = PreparedData(str(folder), corpus_sha1, *sizes, split.note, len(split.test), **held_out)
        _write_prepared(data, vocab, split)
    return data


def _held_out(corpus_path: Path, config: TrainConfig, vocab: Vocab, spans, split) -> dict:
    """Which text is held out and its bytes (`PreparedData`'s held-out fields): from the corpus's spans, or when the
    held-out sizes count tokens, from those tokens (their text read again from the corpus's tail when some of them
    may be `<unk>`: the vocabulary is the whole corpus's, so only a `min_freq` above 1 makes any)."""
    if spans is not None:
        key = spans.key()
        val = span_bytes(corpus_path, *spans.bounds()[1], config.preprocess, config.tokenization, vocab)
        test = span_bytes(corpus_path, *spans.bounds()[2], config.preprocess, config.tokenization, vocab)
    elif config.min_freq <= 1:
        key = f"tokens {config.tokenization} {config.val_tokens}+{config.test_tokens}"
        spaced = config.tokenization == "word"  # a word and the space after it
        lengths = np.array([len(token.encode("utf-8")) + spaced for token in vocab.tokens], dtype=np.int64)
        val, test = (HeldOutBytes(int(lengths[np.asarray(ids)].sum()), 0) for ids in (split.val, split.test))
    else:
        key = f"tokens {config.tokenization} {config.val_tokens}+{config.test_tokens}"
        held = config.val_tokens + config.test_tokens
        tail = tail_tokens(corpus_path, config.preprocess, config.tokenization, held)
        val = token_bytes(tail[: config.val_tokens], vocab, config.tokenization)
        test = token_bytes(tail[config.val_tokens :], vocab, config.tokenization)
    return {
        "held_out_span": key, "val_bytes": val.num_bytes, "val_unk_bytes": val.unk_bytes,
        "test_bytes": test.num_bytes, "test_unk_bytes": test.unk_bytes,
    }  # fmt: skip


def _fits_vocab(data: PreparedData, config: TrainConfig) -> PreparedData:
    """`data`, once the model's options fit its vocabulary (an adaptive softmax's cutoffs lie inside it); else a
    DataError saying what to change, before any training."""
    if config.adaptive_cutoffs and config.adaptive_cutoffs[-1] >= data.vocab_size:
        raise DataError(
            f"adaptive_cutoffs {config.adaptive_cutoffs} reach beyond the vocabulary of {data.vocab_size:,} tokens: "
            f"give cutoffs below {data.vocab_size:,}, or none for the full softmax"
        )
    return data


def _read_prepared(folder: Path) -> PreparedData | None:
    """The prepared data in `folder`, if a preparation finished there (its info.json is written last)."""
    try:
        info = json.loads((folder / "info.json").read_text())
    except (OSError, ValueError):
        return None
    data = PreparedData(**{**info, "folder": str(folder), "reused": True})
    files = (data.vocab_path, data.train_path, data.val_path, data.test_path)
    return data if all(p.is_file() for p in files) else None


def _write_prepared(data: PreparedData, vocab: Vocab, split) -> None:
    """Each file under a temporary name, then renamed over the old one (whose readers keep it); info.json last."""
    info = {k: v for k, v in asdict(data).items() if k not in ("folder", "reused")}
    for path, write in (
        (data.vocab_path, vocab.save),
        (data.train_path, lambda tmp: np.save(tmp, split.train)),
        (data.val_path, lambda tmp: np.save(tmp, split.val)),
        (data.test_path, lambda tmp: np.save(tmp, split.test)),
        (data.info_path, lambda tmp: tmp.write_text(json.dumps(info, indent=1))),
    ):
        with replacing(path) as tmp:
            write(tmp)
