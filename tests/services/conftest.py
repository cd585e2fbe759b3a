"""Fixtures of the tests against real services: a `prefect server start` of their own."""

from __future__ import annotations

import pytest
from helpers.services import prefect_server as running_prefect_server


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory) -> dict[str, str]:
    """A real Prefect server (API + UI) on a free loopback port for the module's tests, with its own PREFECT_HOME;
    yields the environment that clients, workers and flows need to use it (PREFECT_API_URL among it)."""
    with running_prefect_server(tmp_path_factory.mktemp("prefect-server")) as env:
        yield env
