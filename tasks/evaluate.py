"""Evaluation tasks: score a registered version on a text file, and log the score to MLflow tied to that version
and that text.

The score goes to MLflow 3's model metrics with a dataset: `log_metrics(..., model_id=, dataset=)` in an evaluation
run, where `model_id` is the version's LoggedModel and the dataset is the text file (its name, and its sha1 as the
digest). So a score belongs to the model itself (shown on its page, kept whichever run or flow made it), and to one
text, which the registry tells apart by digest (`tracking.versions.text_scores`): the same version scored on two
files keeps two scores. The run (experiment `rnnlm-evaluate`) holds the table and the dataset as its input.
"""

from __future__ import annotations

import functools
import time
import warnings
from dataclasses import asdict
from pathlib import Path

import pandas as pd
from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import DatasetInput, InputTag, LoggedModelInput, Metric
from prefect import get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE

from rnnlm.corpus import sha1_of
from rnnlm.evaluate import score_file
from tracking import store, versions

# the table of scores on a text: bits per byte rank (within one preprocessing), perplexity in each model's own unit
TEXT_COLUMNS = [
    "model", "version", "aliases", "rank", "bits_per_byte", "perplexity", "tokenization", "preprocess", "rnn",
    "not_ranked",
]  # fmt: skip


def text_dataset(path: Path) -> MetaDataset:
    """The text file as an MLflow dataset: its name, and its sha1 (32 hex digits: MLflow's digest column) as the
    digest."""
    path = Path(path).resolve()
    with warnings.catch_warnings():  # MLflow registers its local-file source twice, and says so each time
        warnings.simplefilter("ignore", UserWarning)
        source = resolve_dataset_source(path.as_uri())
    stat = path.stat()
    return MetaDataset(source, name=path.name, digest=_sha1(str(path), stat.st_size, stat.st_mtime_ns)[:32])


@functools.lru_cache(maxsize=16)
def _sha1(path: str, size: int, mtime_ns: int) -> str:
    """A text's sha1, read once per version of the file (its size and time) however many versions score it."""
    return sha1_of(Path(path))


@task(name="models-to-score", cache_policy=NO_CACHE)
def models_to_score(model_name: str, models: list[str] | None, with_champion: bool) -> list[str]:
    """The versions to score: `models`, else every version of `model_name`; `with_champion` adds the champion when
    it is not among them (it defends its title on the text)."""
    records = versions.versions_of(model_name) or []
    refs = list(models or [f"{model_name}/{r['version']}" for r in records])
    champion = versions.holder_of(records, "champion")
    if with_champion and champion is not None and not {f"{model_name}@champion", f"{model_name}/{champion}"} & {*refs}:
        refs.append(f"{model_name}/{champion}")
    return refs


@task(name="score-version", task_run_name="score-{model_ref}", cache_policy=NO_CACHE)
def score_version(model_ref: str, text_path: str, run_id: str) -> dict:
    """Score one registered version (`name@alias` or `name/version`) on the text, with its own preprocessing and
    tokenization, and log the score as that version's model metrics on the text's dataset in run `run_id`."""
    version = versions.resolve(model_ref)
    checkpoint = versions.download_checkpoint(version)
    score = score_file(checkpoint, Path(text_path))
    dataset, now, model_id = text_dataset(Path(text_path)), int(time.time() * 1000), versions.model_id_of(version)
    if model_id is None:
        raise store.TrackingError(f"{model_ref} (v{version.version}) has no logged model to hold its scores")
    metrics = [
        Metric(key, value, now, 0, model_id=model_id, dataset_name=dataset.name, dataset_digest=dataset.digest)
        for key, value in versions.score_metrics(score).items()
    ]
    with store.sqlite_writer_lock(store.tracking_uri(), "evaluate"):
        store.client().log_batch(run_id, metrics=metrics)
    get_run_logger().info(
        "%s (v%s, %s tokens): %.4f bits per byte, perplexity %.3f",
        model_ref, version.version, score.tokenization, score.bits_per_byte or float("nan"), score.perplexity,
    )  # fmt: skip
    identity = {"model": model_ref, "name": version.name, "version": int(version.version)}
    return identity | {"model_id": model_id, **asdict(score)}


@task(name="start-evaluation-run", cache_policy=NO_CACHE)
def start_evaluation_run(text_path: str, experiment: str) -> str:
    """An MLflow run for scoring registered versions on a text, with the text as its input dataset."""
    uri = store.tracking_uri()
    with store.sqlite_writer_lock(uri, "init"):
        experiment_id = store.experiment_id(experiment)
    mlflow_client = store.client()
    created = mlflow_client.create_run(experiment_id, run_name=f"evaluate-{Path(text_path).name}")
    run_id = created.info.run_id
    entity = text_dataset(Path(text_path))._to_mlflow_entity()
    mlflow_client.log_inputs(run_id, datasets=[DatasetInput(entity, [InputTag("mlflow.data.context", "evaluation")])])
    return run_id


@task(name="publish-text-scores", cache_policy=NO_CACHE)
def publish_scores(model_name: str, text_path: str, scored: list[dict], run_id: str) -> tuple[list[dict], list[dict]]:
    """Read the scores back from the registry (each version's model metrics on this text), rank them
    (`tracking.versions.comparison_table`), print the table, make it a Prefect artifact and log it in the run.
    Returns the table's rows and the records of `model_name`'s scored versions (for promotion)."""
    dataset = text_dataset(Path(text_path))
    tables, own = [], []
    for name in sorted({s["name"] for s in scored}):
        records = versions.versions_of(name) or []
        wanted = [r for r in records if r["version"] in {s["version"] for s in scored if s["name"] == name}]
        on_text = versions.on_text(wanted, versions.text_scores(wanted, dataset.digest), dataset.digest, dataset.name)
        own = on_text if name == model_name else own
        tables.append(versions.comparison_table(on_text).assign(model=name))
    table = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(columns=TEXT_COLUMNS)
    table = table.rename(columns={"val_bits_per_byte": "bits_per_byte", "val_perplexity": "perplexity"})[TEXT_COLUMNS]
    print(f"scores on {text_path} (sha1 {dataset.digest}...):\n{table.to_string(index=False)}")
    rows = versions.display_rows(table)
    create_table_artifact(rows, key="text-scores", description=f"versions scored on {dataset.name}, best first")
    mlflow_client = store.client()
    mlflow_client.log_text(run_id, table.to_csv(index=False), "scores.csv")
    mlflow_client.log_text(run_id, f"# scores on {dataset.name}\n\n{versions.to_markdown(table)}\n", "scores.md")
    return rows, own


@task(name="finish-evaluation-run", cache_policy=NO_CACHE)
def finish_evaluation_run(run_id: str, model_ids: list[str]) -> None:
    """Link the scored models to the run as its inputs, and mark the run finished."""
    mlflow_client = store.client()
    if model_ids:
        mlflow_client.log_inputs(run_id, models=[LoggedModelInput(model_id) for model_id in model_ids])
    mlflow_client.set_terminated(run_id, "FINISHED")
