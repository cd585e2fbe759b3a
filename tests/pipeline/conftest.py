"""Fixtures of the pipeline tests: the real flow, fed over loopback HTTP."""

from __future__ import annotations

import pytest
from helpers import CountingHandler, small_text


@pytest.fixture
def corpus_url(tmp_path, serve_dir) -> str:
    """A small corpus served by a real HTTP server on 127.0.0.1 that counts its requests (CountingHandler)."""
    www = tmp_path / "www"
    www.mkdir()
    (www / "book.txt").write_text(small_text(2500))
    CountingHandler.requests_seen = []
    return serve_dir(www, CountingHandler) + "/book.txt"


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    """Every pipeline test trains with one torch thread: two per process collapse on a shared 2-core machine."""
