"""Getting a corpus onto disk from a URL, verified.

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

import json
import time
from pathlib import Path
from urllib.parse import urljoin, urlparse

import requests
import urllib3

from rnnlm.atomic import replacing
from rnnlm.corpus import CHUNK, CorpusError, check_local, is_url, sha1_of
from rnnlm.paths import key_of

DEFAULT_TIMEOUT = (10.0, 30.0)  # (connect, read) seconds
DEFAULT_DEADLINE = 3600.0  # seconds a whole download may take
MAX_REDIRECTS = 5
AS_IS = {"Accept-Encoding": "identity"}  # the body as stored: its Content-Length is then the bytes we write


class DownloadError(OSError):
    """The network failed while downloading (worth retrying); the message names the URL and the way around it."""


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
