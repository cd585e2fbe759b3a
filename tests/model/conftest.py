"""Fixtures of the model-behaviour tests."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    """Every model test trains with one torch thread, as the trainer does by default (and as CPU runs repeat)."""
