"""Getting a corpus onto disk, verified, and reading it as text.

A download is streamed into a temporary file beside its final name and renamed only once its sha1 matches, so the
cache never holds a partial or wrong file. A cached file is reused without touching the network when its sha1
matches, or, with no sha1 to check, when its size and modification time are those recorded at download (a stamp in
`stamps/` beside `corpus/`); otherwise it is downloaded again.

Against real servers: the body is asked for as is (`Accept-Encoding: identity`); a server that compresses it anyway
is decoded, with its Content-Length compared to the bytes that came over the wire and the size limit to the bytes
written. Redirects are followed on the same host (http -> https included); one to another host only when a sha1
will verify what that host sends; one from https to http, or to a scheme that is not http(s), never. A download
has an overall deadline besides the timeout of each read.
"""

from __future__ import annotations

import codecs
import functools
import hashlib
import json
import os
import re
import time
import unicodedata
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote, urljoin, urlparse

import numpy as np
import requests
import urllib3

from rnnlm.atomic import replacing
from rnnlm.paths import key_of

CHUNK = 1 << 20
TEXT_CHUNK = 8 << 20  # the pieces a corpus is read in
DEFAULT_TIMEOUT = (10.0, 30.0)  # (connect, read) seconds
DEFAULT_DEADLINE = 3600.0  # seconds a whole download may take
MAX_REDIRECTS = 5
AS_IS = {"Accept-Encoding": "identity"}  # the body as stored: its Content-Length is then the bytes we write


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
    deadline: float = DEFAULT_DEADLINE,
) -> Path:
    """Return a local, verified path to the corpus named by `source` (URL or path), downloading it if needed.

    Raises CorpusError if a local file is missing, the sha1 does not match, the download exceeds `max_bytes` or
    `deadline` seconds, or a redirect is refused; network failures raise DownloadError (the caller decides whether
    to retry).
    """
    if not is_url(source):
        path = check_local(source)
        _check_sha1(path, sha1, source)
        return path
    target = cache_path_for(source, cache_dir)
    if target.is_file() and (sha1_of(target) == sha1 if sha1 else _stamp_of(target) == _read_stamp(target)):
        return target
    return _download(source, target, sha1, max_bytes, timeout, deadline)


def _stamp_path(target: Path) -> Path:
    """Where the stamp of a downloaded file goes: in `stamps/` beside the corpus folder, which holds only corpora."""
    return target.parent.parent / "stamps" / f"{target.name}.json"


def _stamp_of(path: Path) -> dict:
    """What says a file is unchanged without reading it: its size and modification time."""
    stat = path.stat()
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _read_stamp(target: Path) -> dict | None:
    try:
        return json.loads(_stamp_path(target).read_text())
    except (OSError, ValueError):
        return None


def _check_sha1(path: Path, expected: str | None, source: str) -> None:
    if expected is not None and (actual := sha1_of(path)) != expected:
        raise CorpusError(
            f"sha1 of {source!r} is {actual}, expected {expected}; the file is not the one you meant "
            "(fix --corpus_sha1, or leave it out to accept any content)"
        )


def _download(
    url: str, target: Path, sha1: str | None, max_bytes: int, timeout: tuple[float, float], deadline: float
) -> Path:
    with replacing(target, suffix=".part") as tmp:  # whatever happens, no partial file stays behind
        with open(tmp, "wb") as out:
            _stream(url, out, max_bytes, timeout, deadline, verified=sha1 is not None)
        _check_sha1(tmp, sha1, url)
    stamp = _stamp_path(target)
    stamp.parent.mkdir(exist_ok=True)
    with replacing(stamp, suffix=".part") as tmp:
        tmp.write_text(json.dumps(_stamp_of(target)))
    return target


def _stream(url: str, out, max_bytes: int, timeout: tuple[float, float], deadline: float, verified: bool) -> None:
    """Copy the body of `url` into `out`, enforcing the size limit, the deadline and a complete body."""
    ends_at = time.monotonic() + deadline
    try:
        with _open(url, timeout, verified) as response:
            _check_status(url, response)
            declared = int(response.headers.get("Content-Length") or 0)
            encoded = response.headers.get("Content-Encoding", "identity").lower() not in ("", "identity")
            if declared > max_bytes and not encoded:
                raise CorpusError(
                    f"{url} is {declared:,} bytes, over the limit of {max_bytes:,}; raise --max_download_mb"
                )
            written = 0
            # read1: whatever one read brings, so that bytes trickling in cannot hold a read past the deadline
            while chunk := response.raw.read1(CHUNK, decode_content=True):
                written += len(chunk)
                if written > max_bytes:
                    raise CorpusError(f"{url} sent more than {max_bytes:,} bytes; raise --max_download_mb if right")
                if time.monotonic() > ends_at:
                    raise CorpusError(
                        f"downloading {url} took longer than {deadline:g} s ({written:,} bytes by then); raise "
                        "--download_deadline, or download the file yourself and pass its path: --corpus FILE"
                    )
                out.write(chunk)
            received = response.raw.tell()  # the bytes that came over the wire, before any decoding
    except (requests.RequestException, urllib3.exceptions.HTTPError) as err:
        raise DownloadError(
            f"could not download {url}: {err}. Check the URL and your network, or download the file yourself "
            "and pass its path: --corpus /path/to/file.txt"
        ) from err
    if declared and received != declared:
        raise DownloadError(f"{url} ended after {received:,} of {declared:,} bytes; try again")


def _open(url: str, timeout: tuple[float, float], verified: bool) -> requests.Response:
    """The streaming response for `url`, after the redirects that `_check_redirect` allows."""
    current = url
    for _ in range(MAX_REDIRECTS + 1):
        response = requests.get(current, stream=True, timeout=timeout, headers=AS_IS, allow_redirects=False)
        if not response.is_redirect:
            return response
        response.close()
        target = urljoin(current, response.headers["Location"])
        _check_redirect(url, current, target, verified)
        current = target
    raise CorpusError(f"{url} redirects more than {MAX_REDIRECTS} times; give the URL the file is at")


def _check_redirect(url: str, current: str, target: str, verified: bool) -> None:
    """Refuse a redirect from https to http or to a scheme that is not http(s) (CorpusError), and one to another host
    unless a sha1 will verify what that host sends; the message says the way around."""
    before, after = urlparse(current), urlparse(target)
    if after.scheme not in ("http", "https") or (before.scheme, after.scheme) == ("https", "http"):
        raise CorpusError(
            f"{url} redirects from {before.scheme}:// to {target}; refused (a download never leaves https, and "
            "takes only http(s)). Download the file yourself and pass its path: --corpus FILE"
        )
    if after.hostname != before.hostname and not verified:
        raise CorpusError(
            f"{url} redirects to another host ({target}); refused without a checksum to verify what it sends: give "
            f"--corpus_sha1, or --corpus {target} if you trust that host"
        )


def _check_status(url: str, response: requests.Response) -> None:
    """A 4xx answer will not change on retry (CorpusError); a 5xx may (DownloadError, via raise_for_status); any other
    answer but a 2xx has no file in it (CorpusError)."""
    if not (200 <= response.status_code < 300 or response.status_code >= 500):
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
