"""Registered versions as records: each version joined with its run's params and final metrics, and the comparison
table of them, best validation perplexity first."""

from __future__ import annotations

import math
from datetime import UTC, datetime

import pandas as pd
from mlflow.exceptions import MlflowException
from tabulate import tabulate

from rnnlm.promotion import Candidate
from tracking import store

# What a reader scans first comes first: the version, its aliases and its scores.
COLUMNS = [
    "version",
    "aliases",
    "val_perplexity",
    "test_perplexity",
    "train_perplexity",
    "weights",
    "registered_epoch",
    "run_id",
    "created",
    "rnn",
    "num_layers",
    "num_hiddens",
    "tokenization",
    "max_tokens",
    "epochs",
    "lr",
    "tokens_per_sec",
    "device",
    "engine",
    "preprocess",
    "corpus_sha1",
    "promotion",
]


def _number(value) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def version_record(version, aliases: list[str]) -> dict:
    """One row: a registry version joined with its run's params, final metrics and device tag."""
    try:
        found = store.client().get_run(version.run_id)
        params, metrics, run_tags = found.data.params, found.data.metrics, found.data.tags
    except MlflowException:  # the run was deleted: keep what the version itself carries
        params, metrics, run_tags = {}, {}, {}
    tags = version.tags or {}
    speed = _number(metrics.get("final_tokens_per_sec"))
    return {
        "version": int(version.version),
        "run_id": version.run_id,
        "created": datetime.fromtimestamp(version.creation_timestamp / 1000, UTC).strftime("%Y-%m-%d %H:%M"),
        "rnn": params.get("rnn", tags.get("rnn")),
        "num_layers": params.get("num_layers"),
        "num_hiddens": params.get("num_hiddens"),
        "tokenization": params.get("tokenization", tags.get("tokenization")),
        "max_tokens": params.get("max_tokens"),
        "epochs": params.get("num_epochs"),
        "lr": params.get("lr"),
        "train_perplexity": _number(metrics.get("final_train_perplexity", tags.get("train_perplexity"))),
        # the registered weights' own numbers (the best by validation, or the last); runs from before they were
        # logged have the last epoch's only
        "val_perplexity": _number(
            metrics.get(
                "final_registered_val_perplexity", tags.get("val_perplexity", metrics.get("final_val_perplexity"))
            )
        ),
        "test_perplexity": _number(metrics.get("final_registered_test_perplexity", tags.get("test_perplexity"))),
        "weights": tags.get("weights", "last"),
        "registered_epoch": params.get("num_epochs") if "epoch" not in tags else tags["epoch"],
        "tokens_per_sec": None if speed is None else float(round(speed)),
        "device": run_tags.get("device"),
        "engine": run_tags.get("engine"),
        "aliases": ",".join(sorted(aliases)),
        "preprocess": params.get("preprocess"),
        "corpus_sha1": params.get("corpus_file_sha1"),
        "promotion": tags.get("promotion", ""),
    }


def versions_of(model_name: str) -> list[dict] | None:
    """Every version of the registered model as a record, oldest first; None if the model does not exist."""
    mlflow_client = store.client()
    try:
        aliases_of = mlflow_client.get_registered_model(model_name).aliases or {}
    except MlflowException:
        return None
    by_version: dict[str, list[str]] = {}
    for alias, version in aliases_of.items():
        by_version.setdefault(str(version), []).append(alias)
    versions = mlflow_client.search_model_versions(f"name = '{model_name}'")
    records = [version_record(v, by_version.get(str(v.version), [])) for v in versions]
    return sorted(records, key=lambda r: r["version"])


def candidate(record: dict) -> Candidate:
    """A record as the promotion rule sees it."""
    return Candidate(
        version=record["version"],
        val_perplexity=record["val_perplexity"],
        corpus_sha1=record["corpus_sha1"],
        preprocess=record["preprocess"],
        tokenization=record["tokenization"],
    )


def holder_of(records: list[dict], alias: str) -> int | None:
    """The version that holds `alias`, if any."""
    return next((r["version"] for r in records if alias in r["aliases"].split(",")), None)


def comparison_table(records: list[dict]) -> pd.DataFrame:
    """The records as a table, best validation perplexity first (versions without one last)."""
    table = pd.DataFrame(records, columns=COLUMNS)
    table = table.sort_values(["val_perplexity", "version"], ascending=[True, False], na_position="last")
    return table.reset_index(drop=True)


def display_rows(table: pd.DataFrame) -> list[dict]:
    """The table's rows for the Prefect UI: no NaN (not JSON), floats to 4 decimals."""
    clean = table.astype(object).where(table.notna(), None)
    return [{k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()} for row in clean.to_dict("records")]


def to_markdown(table: pd.DataFrame) -> str:
    """A GitHub-style markdown table (tabulate's), floats to 4 significant digits, empty cells for missing values."""
    escaped = table.map(lambda v: v.replace("|", "\\|") if isinstance(v, str) else v)
    rows = escaped.astype(object).where(table.notna(), None).to_numpy().tolist()
    return tabulate(rows, headers=list(table.columns), tablefmt="pipe", floatfmt=".4g", missingval="")
