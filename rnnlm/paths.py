"""Where the project keeps its files: the download and preparation cache and MLflow's local store.

Each moves with an environment variable. By default both sit in the project's home: `$RNNLM_HOME`, else the source
checkout the package runs from (the folder holding pyproject.toml), else the current directory (an installed
package). The CPU engine keeps its compiled kernels in a cache of its own (`rnnlm.cpu.native.cache()`).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent


def home() -> Path:
    """`$RNNLM_HOME`, else the checkout this package sits in, else the current directory."""
    if os.environ.get("RNNLM_HOME"):
        return Path(os.environ["RNNLM_HOME"]).expanduser().resolve()
    checkout = PACKAGE.parent
    return checkout if (checkout / "pyproject.toml").is_file() else Path.cwd()


def cache_dir(override: str | None = None) -> Path:
    """Downloads, prepared data, checkpoints: `override` (a run's cache_dir), else `$RNNLM_CACHE_DIR`, else
    `<home>/.cache`."""
    chosen = override or os.environ.get("RNNLM_CACHE_DIR")
    return Path(chosen).expanduser().resolve() if chosen else home() / ".cache"


def mlruns() -> Path:
    """MLflow's local store (`mlflow.db` and `artifacts/`) when `MLFLOW_TRACKING_URI` names none: `<home>/mlruns`."""
    return home() / "mlruns"


def key_of(*parts: object, length: int = 16) -> str:
    """A short stable hash of JSON-able parts, for folder and file names that identify their content."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:length]
