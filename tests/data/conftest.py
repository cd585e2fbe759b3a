"""Fixtures of the data tests: the book's corpus, preprocessed as the book does."""

from __future__ import annotations

import pytest

from rnnlm.corpus import read_text
from rnnlm.tokens import prepare_text


@pytest.fixture(scope="session")
def book_chars(real_corpus) -> str:
    """The Time Machine after the book's preprocessing, at character level."""
    return prepare_text(read_text(real_corpus), "book", "char")
