"""Fixtures every folder of tests may use: corpora, a file server, Prefect's test server, private MLflow stores.

Environment for Prefect and MLflow is set before either is imported, so that results, caches and telemetry never
leak into the user's ~/.prefect or out of the machine; the CPU engine's kernel cache is a temporary folder too.
Shared helpers (not fixtures) are in `helpers`.
"""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator
from http.server import ThreadingHTTPServer
from pathlib import Path

import pytest
from helpers import PROJECT_ROOT, SHARED_CORPUS, QuietHandler, find_real_corpus, small_text

from flows.environment import QUIET_DEFAULTS

_PREFECT_HOME = tempfile.mkdtemp(prefix="rnnlm-prefect-")
# the compiled kernels and the engine's measured choices (choices.json): built and measured once per session here,
# never in the user's ~/.cache/rnnlm/kernels (the commands the tests start inherit it); tests that measure a choice
# point RNNLM_KERNEL_CACHE at a folder of their own
_KERNEL_CACHE = tempfile.mkdtemp(prefix="rnnlm-kernels-")
for _folder in (_PREFECT_HOME, _KERNEL_CACHE):
    atexit.register(shutil.rmtree, _folder, ignore_errors=True)
os.environ.update(
    {
        **QUIET_DEFAULTS,
        "PREFECT_HOME": _PREFECT_HOME,
        "RNNLM_KERNEL_CACHE": _KERNEL_CACHE,
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
        "GIT_PYTHON_REFRESH": "quiet",
    }
)
os.environ.pop("MLFLOW_TRACKING_URI", None)
os.environ.pop("PREFECT_API_URL", None)
# Ctrl-C as in a terminal: a suite started as a shell's background job inherits SIGINT ignored, and so would every
# command it starts, where the Ctrl-C tests and stopping a Prefect worker need it (a handler is not inherited: the
# commands get the default)
signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session")
def real_corpus() -> Path:
    """Path of the real corpus; the test is skipped, with the reason, when it is not on this machine."""
    path = find_real_corpus()
    if path is None:
        pytest.skip(f"The Time Machine is neither at {SHARED_CORPUS} nor in {PROJECT_ROOT / '.cache/corpus'}")
    return path


@pytest.fixture
def small_corpus(tmp_path) -> Path:
    """A small generated corpus file (about 15 KB)."""
    path = tmp_path / "small.txt"
    path.write_text(small_text())
    return path


@pytest.fixture
def serve_dir(tmp_path) -> Iterator:
    """Start a real HTTP server on 127.0.0.1 serving a folder; yields `serve(folder) -> base URL`."""
    servers = []

    def serve(folder: Path, handler=QuietHandler) -> str:
        server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(folder)))
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield serve
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture
def one_torch_thread():
    """One torch thread: on a shared 2-core machine two threads per process slow tiny models down many times."""
    from rnnlm.cpu.threads import torch_threads

    with torch_threads(1):
        yield


@pytest.fixture(scope="session")
def prefect_harness():
    """One temporary Prefect server for the whole session (started on first use)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def _mlflow_template(tmp_path_factory) -> Path:
    """A migrated, empty MLflow SQLite database, made once: a fresh migration costs seconds per test."""
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch, _mlflow_template) -> Iterator[str]:
    """A private MLflow store (SQLite + artifacts) for one test, set as MLFLOW_TRACKING_URI; yields the URI."""
    import mlflow

    store = tmp_path / "mlruns"
    store.mkdir()
    shutil.copy(_mlflow_template, store / "mlflow.db")
    uri = f"sqlite:///{store / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    yield uri


@pytest.fixture(autouse=True)
def _reset_mlflow_globals():
    """mlflow keeps the tracking URI and the active run in globals; no test may leak them into the next."""
    yield
    import sys

    if "mlflow" in sys.modules:
        import mlflow

        if mlflow.active_run():
            mlflow.end_run()
        mlflow.set_tracking_uri(None)
        mlflow.set_registry_uri(None)  # register_model sets it (and its environment variable): a stale one
        os.environ.pop("MLFLOW_REGISTRY_URI", None)  # would send the next test's registry reads to another store
