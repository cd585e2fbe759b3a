"""Getting a corpus onto disk, verified, and reading it as text.

A download is streamed into a temporary file beside its final name and renamed only once its sha1 matches, so the
cache never holds a partial or wrong file. A cached file whose sha1 matches is reused without touching the network.
"""

from __future__ import annotations

import codecs
import functools
import hashlib
import os
import re
import unicodedata
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np
import requests

from rnnlm.atomic import replacing
from rnnlm.paths import key_of

CHUNK = 1 << 20
TEXT_CHUNK = 8 << 20  # the pieces a corpus is read in
DEFAULT_TIMEOUT = (10.0, 30.0)  # (connect, read) seconds


class CorpusError(ValueError):
    """A corpus could not be obtained or read; the message says what to do."""


class DownloadError(OSError):
    """The network failed while downloading (worth retrying); the message names the URL and the way around it."""


def sha1_of(path: Path) -> str:
    """Hex sha1 of a file, read in chunks."""
    digest = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def is_url(source: str) -> bool:
    """True for http(s) URLs, which are downloaded; file:// URLs and plain paths are read in place."""
    return urlparse(source).scheme.lower() in ("http", "https")


def local_path(source: str) -> Path:
    """The filesystem path of a `file://` URL or a plain path."""
    parsed = urlparse(source)
    if parsed.scheme.lower() == "file":
        return Path(unquote(parsed.path))
    return Path(source).expanduser()


def check_local(source: str) -> Path:
    """The path of a local corpus (a plain path or a file:// URL), once it is known to be a readable file; raises
    CorpusError saying what it is instead and what to give. A no-op in cost: nothing is read."""
    path = local_path(source)
    if path.is_dir():
        raise CorpusError(f"corpus {str(path)!r} is a folder; give the path of a text file (or an http(s) URL)")
    if not path.exists():
        raise CorpusError(f"corpus file {str(path)!r} does not exist; give an existing path or an http(s) URL")
    if not path.is_file():
        raise CorpusError(f"corpus {str(path)!r} is not a regular file; give the path of a text file")
    if not os.access(path, os.R_OK):
        raise CorpusError(f"corpus file {str(path)!r} cannot be read (permission denied); check its permissions")
    return path


def cache_path_for(url: str, cache_dir: Path) -> Path:
    """Where a URL is cached: its file name, prefixed by a hash of the whole URL so that names cannot collide."""
    name = Path(urlparse(url).path).name or "corpus.txt"
    return cache_dir / "corpus" / f"{key_of(url, length=10)}-{name}"


def fetch_corpus(
    source: str,
    cache_dir: Path,
    sha1: str | None = None,
    max_bytes: int = 1 << 30,
    timeout: tuple[float, float] = DEFAULT_TIMEOUT,
) -> Path:
    """Return a local, verified path to the corpus named by `source` (URL or path), downloading it if needed.

    Raises CorpusError if a local file is missing, the sha1 does not match, or the download exceeds `max_bytes`;
    network failures raise DownloadError (the caller decides whether to retry).
    """
    if not is_url(source):
        path = check_local(source)
        _check_sha1(path, sha1, source)
        return path
    target = cache_path_for(source, cache_dir)
    if target.is_file() and (sha1 is None or sha1_of(target) == sha1):
        return target
    return _download(source, target, sha1, max_bytes, timeout)


def _check_sha1(path: Path, expected: str | None, source: str) -> None:
    if expected is not None and (actual := sha1_of(path)) != expected:
        raise CorpusError(
            f"sha1 of {source!r} is {actual}, expected {expected}; the file is not the one you meant "
            "(fix --corpus_sha1, or leave it out to accept any content)"
        )


def _download(url: str, target: Path, sha1: str | None, max_bytes: int, timeout: tuple[float, float]) -> Path:
    with replacing(target, suffix=".part") as tmp:  # whatever happens, no partial file stays behind
        with open(tmp, "wb") as out:
            _stream(url, out, max_bytes, timeout)
        _check_sha1(tmp, sha1, url)
    return target


def _stream(url: str, out, max_bytes: int, timeout: tuple[float, float]) -> None:
    """Copy the body of `url` into `out`, enforcing the size limit and a complete body."""
    try:
        with requests.get(url, stream=True, timeout=timeout) as response:
            _check_status(url, response)
            declared = int(response.headers.get("Content-Length") or 0)
            if declared > max_bytes:
                raise CorpusError(
                    f"{url} is {declared:,} bytes, over the limit of {max_bytes:,}; raise --max_download_mb"
                )
            written = 0
            for chunk in response.iter_content(CHUNK):
                written += len(chunk)
                if written > max_bytes:
                    raise CorpusError(f"{url} sent more than {max_bytes:,} bytes; raise --max_download_mb if right")
                out.write(chunk)
    except requests.RequestException as err:
        raise DownloadError(
            f"could not download {url}: {err}. Check the URL and your network, or download the file yourself "
            "and pass its path: --corpus /path/to/file.txt"
        ) from err
    if declared and written != declared:
        raise DownloadError(f"{url} ended after {written:,} of {declared:,} bytes; try again")


def _check_status(url: str, response: requests.Response) -> None:
    """A 4xx answer will not change on retry (CorpusError); a 5xx may (DownloadError, via raise_for_status)."""
    if 400 <= response.status_code < 500:
        raise CorpusError(f"{url} answered {response.status_code} {response.reason}; check the URL")
    response.raise_for_status()


def read_text(path: Path) -> str:
    """Read a corpus as UTF-8, refusing binary files and undecodable bytes with a message saying where."""
    return b"".join(read_chunks(path)).decode("utf-8")


def read_chunks(path: Path, chunk_bytes: int = TEXT_CHUNK) -> Iterator[bytes]:
    """The file in pieces of about `chunk_bytes`, each ending at a line break (the last one may not), so that no line
    and no UTF-8 character is cut. Refuses binary files (NUL bytes near the start) and invalid UTF-8, saying where
    and what to do, before yielding the piece that holds it."""
    decoder, offset = codecs.getincrementaldecoder("utf-8")(), 0
    for chunk in _line_chunks(path, chunk_bytes):
        if not chunk.isascii():
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as err:
                raise CorpusError(
                    f"{path} is not valid UTF-8 (byte {offset + err.start:,}); "
                    "convert it first, e.g. `iconv -f latin1 -t utf-8`"
                ) from None
        offset += len(chunk)
        yield chunk


def _line_chunks(path: Path, chunk_bytes: int) -> Iterator[bytes]:
    """The raw file in pieces of about `chunk_bytes` that end at line breaks; a file with NUL bytes near its start
    is refused as binary."""
    with open(path, "rb") as f:
        rest = b""
        while block := f.read(chunk_bytes):
            if f.tell() == len(block) and b"\x00" in block[:CHUNK]:
                raise CorpusError(f"{path} looks binary (it contains NUL bytes); give a plain-text corpus")
            block = rest + block
            cut = block.rfind(b"\n") + 1
            if cut == 0:  # one very long line: keep reading
                rest = block
                continue
            rest = block[cut:]
            yield block[:cut]
        if rest:
            yield rest


# The book's preprocessing as one byte translation: letters lowercased, a line break marked by \x01 (which no other
# byte maps to), every other byte (punctuation, digits, whitespace, each byte of a non-ASCII character) a space.
_BOOK_TABLE = bytes(c + 32 if 65 <= c <= 90 else c if 97 <= c <= 122 else 1 if c == 10 else 32 for c in range(256))


def preprocess(text: str, mode: str = "book") -> str:
    """Normalise raw text. 'book' is D2L's `read_time_machine`: per line, runs of non-letters become one space, the
    line is stripped and lowercased, and the lines are joined with nothing between them. 'words' is for real text
    at word level: lowercased, each punctuation mark split off as its own token, tokens and lines joined by one
    space (see `split_words`). 'raw' returns the text. Both 'words' and 'raw' take text of any script, NFC-normalised
    (a letter and its accent typed apart or together are one character)."""
    if mode == "raw":
        return text if text.isascii() else unicodedata.normalize("NFC", text)
    if mode == "words":
        text = text if text.isascii() else unicodedata.normalize("NFC", text)
        return " ".join(" ".join(split_words(line)) for line in text.split("\n") if line.strip())
    if mode != "book":
        raise ValueError(f"unknown preprocess mode {mode!r}; use 'book', 'words' or 'raw'")
    return preprocess_book_bytes(text.encode("utf-8")).decode("ascii")


# Scripts written without spaces between words (CJK ideographs, kana): each character is a word of its own
_NO_SPACES = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002fa1f"


@functools.cache
def _word_pattern() -> re.Pattern:
    """A word (letters and digits, with their combining marks, e.g. Devanagari's vowel signs, and inner apostrophes
    or hyphens: "don't", "well-known"), one character of a script without spaces, or one other visible character."""
    marks = "".join(chr(c) for c in range(0x300, 0x10000) if unicodedata.category(chr(c))[0] == "M")
    letter = f"(?:[^\\W_{_NO_SPACES}]|[{re.escape(marks)}])"
    return re.compile(f"{letter}+(?:['’-]{letter}+)*|[{_NO_SPACES}]|[^\\w\\s]|_")


def split_words(line: str) -> list[str]:
    """One line of text as lowercased words and punctuation marks; in CJK scripts, one word a character.

    "Then, he said: 'Go!'" -> then , he said : ' go ! '
    """
    return _word_pattern().findall(line.lower())


def preprocess_book_bytes(data: bytes) -> bytes:
    """The book's preprocessing on UTF-8 bytes, at C speed (a translation and a few vectorised passes, no per-line
    Python).

    Equal to `"".join(re.sub("[^A-Za-z]+", " ", line).strip().lower() for line in text.split("\n"))`: a non-ASCII
    character is a non-letter for that regex, and all of its UTF-8 bytes are non-letters here.
    """
    chars = np.frombuffer(data.translate(_BOOK_TABLE), dtype=np.uint8)
    space = chars == 32
    repeat = space.copy()
    repeat[1:] &= space[:-1]
    chars = chars[~repeat]  # every run of spaces is now one space
    letter = chars > 32
    drop = ~letter  # line marks go (the lines are joined with nothing) and so do spaces...
    drop[1:-1] &= ~(letter[:-2] & letter[2:]) | (chars[1:-1] == 1)  # ...except a space between two letters
    return chars[~drop].tobytes()
