"""The model registry: read every version with its run, decide and record promotions, publish the comparison.

Aliases, not stages: `champion` is the version to serve (`models:/rnnlm@champion`), `challenger` the newest one.
Each decision is kept on the versions it concerns as the tags `promotion` (the reason) and `promotion_at`.
"""

from __future__ import annotations

import math
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
from mlflow.exceptions import MlflowException
from prefect import get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE

from rnnlm.promotion import Candidate, Decision, decide
from tasks.tracking import client, experiment_id, tracking_uri

# What a reader scans first comes first: the version, its aliases and its scores.
COLUMNS = [
    "version",
    "aliases",
    "val_perplexity",
    "train_perplexity",
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


def _rounded(value: float | None) -> float | None:
    return None if value is None else float(round(value))


def version_record(version, aliases: list[str]) -> dict:
    """One row: a registry version joined with its run's params, final metrics and device tag."""
    try:
        run = client().get_run(version.run_id)
        params, metrics, run_tags = run.data.params, run.data.metrics, run.data.tags
    except MlflowException:  # the run was deleted: keep what the version itself carries
        params, metrics, run_tags = {}, {}, {}
    tags = version.tags or {}
    return {
        "version": int(version.version),
        "run_id": version.run_id,
        "created": datetime.fromtimestamp(version.creation_timestamp / 1000, timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "rnn": params.get("rnn", tags.get("rnn")),
        "num_layers": params.get("num_layers"),
        "num_hiddens": params.get("num_hiddens"),
        "tokenization": params.get("tokenization", tags.get("tokenization")),
        "max_tokens": params.get("max_tokens"),
        "epochs": params.get("num_epochs"),
        "lr": params.get("lr"),
        "train_perplexity": _number(metrics.get("final_train_perplexity", tags.get("train_perplexity"))),
        "val_perplexity": _number(metrics.get("final_val_perplexity", tags.get("val_perplexity"))),
        "tokens_per_sec": _rounded(_number(metrics.get("final_tokens_per_sec"))),
        "device": run_tags.get("device"),
        "aliases": ",".join(sorted(aliases)),
        "preprocess": params.get("preprocess"),
        "corpus_sha1": params.get("corpus_file_sha1"),
        "promotion": tags.get("promotion", ""),
    }


@task(name="read-registry", cache_policy=NO_CACHE)
def read_versions(model_name: str) -> list[dict]:
    """Every version of the registered model with its run's facts; an empty list if the model does not exist."""
    mlflow_client = client()
    try:
        aliases_of = mlflow_client.get_registered_model(model_name).aliases or {}
    except MlflowException:
        get_run_logger().warning("no registered model %r in %s", model_name, tracking_uri())
        return []
    by_version: dict[str, list[str]] = {}
    for alias, version in aliases_of.items():
        by_version.setdefault(str(version), []).append(alias)
    versions = mlflow_client.search_model_versions(f"name = '{model_name}'")
    records = [version_record(v, by_version.get(str(v.version), [])) for v in versions]
    return sorted(records, key=lambda r: r["version"])


def comparison_table(records: list[dict]) -> pd.DataFrame:
    """The records as a table, best validation perplexity first (versions without one last)."""
    table = pd.DataFrame(records, columns=COLUMNS)
    return table.sort_values(["val_perplexity", "version"], ascending=[True, False], na_position="last").reset_index(
        drop=True
    )


def _is_nan(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _display(value):
    """A table cell for the Prefect UI: no NaN (not JSON), floats to 4 decimals."""
    if _is_nan(value):
        return None
    return round(value, 4) if isinstance(value, float) else value


def to_markdown(table: pd.DataFrame) -> str:
    """A GitHub-style markdown table (no extra dependency)."""

    def cell(value) -> str:
        if _is_nan(value):
            return ""
        text = f"{value:.4g}" if isinstance(value, float) else str(value)
        return text.replace("|", "\\|")

    lines = ["| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines)


def _candidate(record: dict) -> Candidate:
    return Candidate(
        version=record["version"],
        val_perplexity=record["val_perplexity"],
        corpus_sha1=record["corpus_sha1"],
        preprocess=record["preprocess"],
        tokenization=record["tokenization"],
    )


def _current(records: list[dict], alias: str) -> int | None:
    return next((r["version"] for r in records if alias in r["aliases"].split(",")), None)


@task(name="promote", cache_policy=NO_CACHE)
def promote(model_name: str, records: list[dict], margin: float = 0.0) -> dict:
    """Decide the champion and challenger, move the aliases and tag each version concerned with the reason."""
    logger = get_run_logger()
    decision: Decision = decide([_candidate(r) for r in records], _current(records, "champion"), margin)
    mlflow_client = client()
    for alias in ("champion", "challenger"):
        version = getattr(decision, alias)
        if version is not None and version != _current(records, alias):
            mlflow_client.set_registered_model_alias(model_name, alias, str(version))
    now = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    for version, reason in decision.reasons.items():
        mlflow_client.set_model_version_tag(model_name, str(version), "promotion", reason)
        mlflow_client.set_model_version_tag(model_name, str(version), "promotion_at", now)
        logger.info("%s v%d: %s", model_name, version, reason)
    return {"champion": decision.champion, "challenger": decision.challenger, "promoted": decision.promoted}


@task(name="publish-comparison", cache_policy=NO_CACHE)
def publish_comparison(model_name: str, records: list[dict], experiment: str) -> str:
    """Print the table, make it a Prefect table artifact, and log it as CSV and markdown in an MLflow run.

    Returns the id of that MLflow run (in `experiment`, apart from the training runs).
    """
    table = comparison_table(records)
    print(table.drop(columns=["corpus_sha1", "promotion"]).to_string(index=False))
    rows = [{k: _display(v) for k, v in row.items()} for row in table.to_dict("records")]
    create_table_artifact(rows, key="registry-comparison", description=f"versions of {model_name}, best first")
    mlflow_client = client()
    run = mlflow_client.create_run(experiment_id(experiment), run_name=f"compare-{model_name}")
    with tempfile.TemporaryDirectory() as tmp:
        table.to_csv(Path(tmp) / "comparison.csv", index=False)
        title = f"# {model_name}: versions by validation perplexity"
        (Path(tmp) / "comparison.md").write_text(f"{title}\n\n{to_markdown(table)}\n")
        mlflow_client.log_artifact(run.info.run_id, str(Path(tmp) / "comparison.csv"))
        mlflow_client.log_artifact(run.info.run_id, str(Path(tmp) / "comparison.md"))
    mlflow_client.set_tag(run.info.run_id, "registered_model", model_name)
    mlflow_client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id
