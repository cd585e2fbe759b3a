"""Registry tasks: read every version with its run, decide and record promotions, publish the comparison.

Aliases, not stages: `champion` is the version to serve (`models:/rnnlm@champion`), `challenger` the newest one.
Each decision is kept on the versions it concerns as the tags `promotion` (the reason) and `promotion_at`.
"""

from __future__ import annotations

from datetime import UTC, datetime

from prefect import get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE

from rnnlm.promotion import decide
from tracking import store, versions


@task(name="read-registry", cache_policy=NO_CACHE)
def read_versions(model_name: str) -> list[dict]:
    """Every version of the registered model with its run's facts; an empty list if the model does not exist."""
    records = versions.versions_of(model_name)
    if records is None:
        get_run_logger().warning("no registered model %r in %s", model_name, store.tracking_uri())
    return records or []


@task(name="promote", cache_policy=NO_CACHE)
def promote(model_name: str, records: list[dict], margin: float = 0.0) -> dict:
    """Decide the champion and challenger, move the aliases and tag each version concerned with the reason."""
    decision = decide([versions.candidate(r) for r in records], versions.holder_of(records, "champion"), margin)
    mlflow_client = store.client()
    for alias in ("champion", "challenger"):
        version = getattr(decision, alias)
        if version is not None and version != versions.holder_of(records, alias):
            mlflow_client.set_registered_model_alias(model_name, alias, str(version))
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    for version, reason in decision.reasons.items():
        mlflow_client.set_model_version_tag(model_name, str(version), "promotion", reason)
        mlflow_client.set_model_version_tag(model_name, str(version), "promotion_at", now)
        get_run_logger().info("%s v%d: %s", model_name, version, reason)
    return {"champion": decision.champion, "challenger": decision.challenger, "promoted": decision.promoted}


@task(name="publish-comparison", cache_policy=NO_CACHE)
def publish_comparison(model_name: str, records: list[dict], experiment: str) -> str:
    """Print the table, make it a Prefect table artifact, and log it as CSV and markdown in an MLflow run of
    `experiment` (apart from the training runs); returns that run's id."""
    table = versions.comparison_table(records)
    print(table.drop(columns=["corpus_sha1", "promotion"]).to_string(index=False))
    rows = versions.display_rows(table)
    create_table_artifact(rows, key="registry-comparison", description=f"versions of {model_name}, best first")
    mlflow_client = store.client()
    created = mlflow_client.create_run(store.experiment_id(experiment), run_name=f"compare-{model_name}")
    run_id = created.info.run_id
    mlflow_client.log_text(run_id, table.to_csv(index=False), "comparison.csv")
    title = f"# {model_name}: versions by validation bits per byte of one held-out text"
    mlflow_client.log_text(run_id, f"{title}\n\n{versions.to_markdown(table)}\n", "comparison.md")
    mlflow_client.set_tag(run_id, "registered_model", model_name)
    mlflow_client.set_terminated(run_id, "FINISHED")
    return run_id
