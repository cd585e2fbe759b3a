"""Tokenization and the vocabulary, as D2L defines them, on whole texts and on corpora of any size.

The vocabulary is `<unk>` at index 0, then reserved tokens, then every token seen at least `min_freq` times by
descending frequency; ties keep the order of first appearance (what the book's stable sort over a Counter gives),
so indices match the book's exactly. `tokenize_file` streams a corpus in chunks straight into a `.npy` of ids, with
memory bounded by the chunk, not the file: characters of ASCII text at C speed (`bytes.translate`, numpy), words and
other text chunk by chunk through a Counter. It equals `prepare_text` + `build_vocab` + `encode` on the whole text.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from rnnlm.corpus import TEXT_CHUNK, preprocess, preprocess_book_bytes, read_chunks

UNK = "<unk>"


class Vocab:
    """Token <-> index mapping. `tokens[0]` is always `<unk>`; unknown tokens map to 0. A byte-level BPE vocabulary
    (tokenization 'bpe', see `rnnlm.bpe`) also carries its tokenizer as JSON, which encodes and decodes its text."""

    def __init__(self, tokens: list[str], tokenizer: str | None = None):
        if not tokens or tokens[0] != UNK:
            raise ValueError(f"a vocabulary starts with {UNK!r}")
        if len(set(tokens)) != len(tokens):
            raise ValueError("a vocabulary cannot repeat a token")
        self.tokens = list(tokens)
        self.index = {token: i for i, token in enumerate(self.tokens)}
        self.tokenizer = tokenizer
        self._bpe = None

    def __len__(self) -> int:
        return len(self.tokens)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocab) and self.tokens == other.tokens and self.tokenizer == other.tokenizer

    @property
    def bpe(self):
        """The byte-level BPE tokenizer (a `tokenizers.Tokenizer`) of a 'bpe' vocabulary; ValueError for others."""
        if self.tokenizer is None:
            raise ValueError("this vocabulary has no BPE tokenizer (tokenization 'char' or 'word')")
        if self._bpe is None:
            from rnnlm import bpe

            self._bpe = bpe.from_json(self.tokenizer)
        return self._bpe

    def to_ids(self, tokens: list[str]) -> list[int]:
        """Indices of tokens; unknown ones become 0 (`<unk>`)."""
        return [self.index.get(token, 0) for token in tokens]

    def to_tokens(self, ids) -> list[str]:
        """Tokens of indices."""
        return [self.tokens[int(i)] for i in ids]

    def unknown(self, tokens: list[str]) -> list[str]:
        """The distinct tokens not in the vocabulary, in order of appearance."""
        return list(dict.fromkeys(t for t in tokens if t not in self.index))

    def ascii_ids(self) -> np.ndarray:
        """A 256-entry table from byte to the index of that ASCII character (0 = `<unk>` where it is not a token)."""
        table = np.zeros(256, dtype=id_dtype(len(self)))
        for i, token in enumerate(self.tokens):
            if len(token) == 1 and token.isascii():
                table[ord(token)] = i
        return table

    def save(self, path: Path) -> None:
        """Write the vocabulary as JSON (`{"tokens": [...]}`)."""
        extra = {"tokenizer": self.tokenizer} if self.tokenizer is not None else {}
        Path(path).write_text(json.dumps({"tokens": self.tokens, **extra}, ensure_ascii=False))

    @classmethod
    def load(cls, path: Path) -> Vocab:
        """Read a vocabulary written by `save`."""
        saved = json.loads(Path(path).read_text())
        return cls(saved["tokens"], saved.get("tokenizer"))


def split_tokens(text: str, tokenization: str) -> list[str]:
    """Split prepared text into tokens: characters, or whitespace-separated words (BPE needs its tokenizer: see
    `text_ids`)."""
    if tokenization == "char":
        return list(text)
    if tokenization == "word":
        return text.split()
    raise ValueError(f"unknown tokenization {tokenization!r}; use 'char' or 'word' (or 'bpe' through its vocab)")


def text_ids(text: str, vocab: Vocab, tokenization: str) -> list[int]:
    """The ids of prepared text under any tokenization (unknown characters or words become 0, `<unk>`)."""
    if tokenization == "bpe":
        from rnnlm import bpe

        return bpe.encode(vocab.bpe, text)
    return vocab.to_ids(split_tokens(text, tokenization))


def ids_text(ids, vocab: Vocab, tokenization: str) -> str:
    """The text of ids under any tokenization (`join_tokens` of their tokens; BPE decodes its bytes)."""
    if tokenization == "bpe":
        from rnnlm import bpe

        return bpe.decode(vocab.bpe, ids)
    return join_tokens(vocab.to_tokens(ids), tokenization)


def join_tokens(tokens: list[str], tokenization: str) -> str:
    """Inverse of `split_tokens` up to whitespace."""
    return "".join(tokens) if tokenization == "char" else " ".join(tokens)


def prepare_text(raw: str, preprocess_mode: str, tokenization: str) -> str:
    """Preprocess raw text for a tokenization. The book joins lines with nothing between them at character level
    (and for BPE, which sees the same text); words must not merge across a line break, so word level keeps a space
    there."""
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
    if tokenization == "char" and text.isascii():
        return vocab.ascii_ids()[np.frombuffer(text.encode("ascii"), dtype=np.uint8)]
    return np.asarray(text_ids(text, vocab, tokenization), dtype=id_dtype(len(vocab)))


# --- corpora of any size ------------------------------------------------------------------------------------------


def tokenize_file(
    path: Path,
    out_path: Path,
    preprocess_mode: str = "book",
    tokenization: str = "char",
    min_freq: int = 0,
    chunk_bytes: int = TEXT_CHUNK,
) -> tuple[Vocab, np.ndarray]:
    """Preprocess and tokenize `path`, build the book's vocab, and write the ids as a `.npy` at `out_path`.

    Returns the vocab and the ids memory-mapped read-only. Characters of ASCII text take the fast path: one pass
    preprocesses, counts and writes the characters beside `out_path`, a second maps them to ids. Anything else is
    correct but slower (Python's Counter), and still holds one chunk at a time.
    """
    out_path = Path(out_path)
    if tokenization == "char":
        chars = out_path.with_name(out_path.name + ".chars")
        try:
            counts = _write_ascii(_prepared_chunks(path, preprocess_mode, chunk_bytes), chars)
            if counts is not None:
                vocab = Vocab(rank_counts(counts, min_freq))
                _write_ids(out_path, vocab, chars)
                return vocab, np.load(out_path, mmap_mode="r")
        finally:
            chars.unlink(missing_ok=True)
    return _tokenize_general(path, out_path, preprocess_mode, tokenization, min_freq, chunk_bytes)


def _prepared_chunks(path: Path, preprocess_mode: str, chunk_bytes: int) -> Iterator[bytes]:
    """Preprocessed UTF-8 text, chunk by chunk (the book's preprocessing is per line, so chunks are independent)."""
    for chunk in read_chunks(path, chunk_bytes):
        if preprocess_mode == "book":
            yield preprocess_book_bytes(chunk)
        elif preprocess_mode == "words":  # chunks end at line breaks: a space joins them as it joins lines
            yield (preprocess(chunk.decode("utf-8"), "words") + " ").encode("utf-8")
        else:
            yield chunk if chunk.isascii() else preprocess(chunk.decode("utf-8"), "raw").encode("utf-8")


def prepared_texts(chunks: Iterator[bytes], preprocess_mode: str, tokenization: str) -> Iterator[str]:
    """Raw UTF-8 chunks that end at line breaks (`read_chunks`) as prepared text, chunk by chunk; their
    concatenation is `prepare_text` of the whole text, as far as its tokens go."""
    # word level and 'words' keep a space at line breaks (see prepare_text); a chunk ends at one
    spaced = tokenization == "word" or preprocess_mode == "words"
    for chunk in chunks:
        yield prepare_text(chunk.decode("utf-8"), preprocess_mode, tokenization) + (" " if spaced else "")


def count_tokens(texts: Iterator[str], tokenization: str) -> Counter:
    """Character or word counts of prepared texts, in order of first appearance."""
    counts: Counter = Counter()
    for text in texts:
        counts.update(text if tokenization == "char" else text.split())
    return counts


def _write_ascii(chunks: Iterator[bytes], out_path: Path) -> dict[str, int] | None:
    """Write ASCII chunks to `out_path`, counting characters in order of first appearance; None as soon as a chunk
    is not ASCII (that text takes the general path)."""
    counts, first, total = np.zeros(256, dtype=np.int64), {}, 0
    with open(out_path, "wb") as f:
        for chunk in chunks:
            if not chunk.isascii():
                return None
            chunk_counts = np.bincount(np.frombuffer(chunk, dtype=np.uint8), minlength=256)
            for byte in np.flatnonzero(chunk_counts).tolist():
                if byte not in first:
                    first[byte] = total + chunk.find(bytes([byte]))
            counts += chunk_counts
            total += len(chunk)
            f.write(chunk)
    return {chr(b): int(counts[b]) for b in sorted(first, key=first.get)}


def _write_ids(out_path: Path, vocab: Vocab, chars: Path) -> None:
    """The characters of `chars` as vocabulary ids in a `.npy`, chunk by chunk."""
    table, text = vocab.ascii_ids(), np.memmap(chars, dtype=np.uint8, mode="r") if chars.stat().st_size else []
    ids = np.lib.format.open_memmap(out_path, mode="w+", dtype=table.dtype, shape=(len(text),))
    for start in range(0, len(text), TEXT_CHUNK):
        ids[start : start + TEXT_CHUNK] = table[text[start : start + TEXT_CHUNK]]
    ids.flush()
    del ids


def _tokenize_general(
    path: Path, out_path: Path, preprocess_mode: str, tokenization: str, min_freq: int, chunk_bytes: int
) -> tuple[Vocab, np.ndarray]:
    """Any tokenization and any UTF-8 text, chunk by chunk: a Counter pass, then an encoding pass."""

    def texts() -> Iterator[str]:
        return prepared_texts(read_chunks(path, chunk_bytes), preprocess_mode, tokenization)

    counts = count_tokens(texts(), tokenization)
    vocab = Vocab(rank_counts(dict(counts), min_freq))
    ids = np.lib.format.open_memmap(out_path, mode="w+", dtype=id_dtype(len(vocab)), shape=(sum(counts.values()),))
    written = 0
    for text in texts():
        chunk = encode(text, vocab, tokenization)
        if written + len(chunk) > len(ids):
            raise RuntimeError(f"{path} grew while it was tokenized; run again on a file that does not change")
        ids[written : written + len(chunk)] = chunk
        written += len(chunk)
    if written != len(ids):
        raise RuntimeError(f"{path} changed while it was tokenized; run again on a file that does not change")
    ids.flush()
    del ids
    return vocab, np.load(out_path, mmap_mode="r")
