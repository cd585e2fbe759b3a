"""Registered versions as records: each version joined with its run's params and final metrics, and the comparison
table of them: the versions scored on the reference version's held-out text (the champion's, else the newest's)
ranked by validation bits per byte, the others unranked with the reason (`rnnlm.promotion.not_comparable`)."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd
from mlflow.exceptions import MlflowException
from tabulate import tabulate

from rnnlm import paths
from rnnlm.promotion import Candidate, not_comparable
from tracking import store

# What a reader scans first comes first: the version, its aliases and its scores.
COLUMNS = [
    "version",
    "aliases",
    "val_perplexity",
    "val_bits_per_byte",
    "test_bits_per_byte",
    "rank",
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
    "held_out",
    "not_ranked",
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
        "val_bits_per_byte": _number(
            metrics.get("final_registered_val_bits_per_byte", tags.get("val_bits_per_byte"))
        ),
        "test_bits_per_byte": _number(
            metrics.get("final_registered_test_bits_per_byte", tags.get("test_bits_per_byte"))
        ),
        "held_out": tags.get("held_out", run_tags.get("held_out")) or None,
        "weights": tags.get("weights", "last"),
        "registered_epoch": params.get("num_epochs") if "epoch" not in tags else tags["epoch"],
        "tokens_per_sec": None if speed is None else float(round(speed)),
        "device": run_tags.get("device"),
        "engine": run_tags.get("engine"),
        "aliases": ",".join(sorted(aliases)),
        "preprocess": params.get("preprocess"),
        "corpus_sha1": params.get("corpus_file_sha1"),
        "promotion": tags.get("promotion", ""),
        "model_id": model_id_of(version),
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
        val_perplexity=record.get("val_perplexity"),
        corpus_sha1=record.get("corpus_sha1"),
        preprocess=record.get("preprocess"),
        tokenization=record.get("tokenization"),
        val_bits_per_byte=record.get("val_bits_per_byte"),
        held_out=record.get("held_out"),
    )


# --- scores of versions on a text (flows/evaluate_flow.py) ---------------------------------------------------------


def resolve(model_ref: str):
    """The registry's ModelVersion for `name@alias` or `name/version`; TrackingError naming what is missing."""
    mlflow_client = store.client()
    name, alias = model_ref.split("@", 1) if "@" in model_ref else (model_ref, None)
    name, number = name.rsplit("/", 1) if alias is None and "/" in name else (name, None)
    if alias is None and (number is None or not number.isdigit()):
        raise store.TrackingError(f"model {model_ref!r}: give name@alias or name/version, e.g. rnnlm@champion, rnnlm/3")
    try:
        if alias is not None:
            return mlflow_client.get_model_version_by_alias(name, alias)
        return mlflow_client.get_model_version(name, number)
    except MlflowException as err:
        raise store.TrackingError(f"model {model_ref!r} is not in the registry at {store.tracking_uri()}") from err


def model_id_of(version) -> str | None:
    """The id of the LoggedModel a version registers (a SQLite registry leaves `model_id` empty; its source names
    it: models:/m-...)."""
    if found := getattr(version, "model_id", None):
        return found
    source = getattr(version, "source", "") or ""
    return source.removeprefix("models:/") if source.startswith("models:/m-") else None


def download_checkpoint(version) -> Path:
    """The version's checkpoint (its pyfunc's `checkpoint` artifact), downloaded once into the cache."""
    import mlflow

    folder = paths.cache_dir(None) / "models" / f"{version.name}-{version.version}-{version.run_id}"
    if not (found := sorted(folder.glob("**/artifacts/*.pt"))):
        folder.mkdir(parents=True, exist_ok=True)
        with store.global_store(store.tracking_uri()):
            uri = f"models:/{version.name}/{version.version}"
            mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(folder))
        found = sorted(folder.glob("**/artifacts/*.pt"))
    if not found:
        raise store.TrackingError(f"{version.name} v{version.version} holds no rnnlm checkpoint")
    return found[0]


def score_metrics(score) -> dict[str, float]:
    """The metrics a score of a version on a text is logged as (an `rnnlm.evaluate.TextScore`)."""
    metrics = {
        "text_bits_per_byte": score.bits_per_byte,
        "text_perplexity": score.perplexity,
        "text_bits_per_token": score.bits_per_token,
    }
    return {k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(v)}


def text_scores(records: list[dict], digest: str) -> dict[int, dict[str, float]]:
    """Version -> its logged scores on the text of `digest` (its LoggedModel's metrics on that dataset), for the
    versions that have some."""
    mlflow_client, found = store.client(), {}
    for record in records:
        if not record.get("model_id"):
            continue
        metrics = mlflow_client.get_logged_model(record["model_id"]).metrics or []
        scores = {m.key: m.value for m in sorted(metrics, key=lambda m: m.timestamp) if m.dataset_digest == digest}
        if scores:
            found[record["version"]] = scores
    return found


def on_text(records: list[dict], scores: dict[int, dict[str, float]], digest: str, name: str) -> list[dict]:
    """The records of the versions scored on one text, with those scores in place of their held-out ones, so that
    `comparison_table` ranks them and `rnnlm.promotion.decide` promotes among them: all are scored on the same text,
    and those of the same preprocessing (which decides the text a model sees) compare, whatever their tokens."""
    return [
        {
            **record,
            "val_bits_per_byte": scores[record["version"]].get("text_bits_per_byte"),
            "val_perplexity": scores[record["version"]].get("text_perplexity"),
            "test_bits_per_byte": None,
            "test_perplexity": None,
            "corpus_sha1": digest,
            "held_out": f"all of {name}",
        }
        for record in records
        if record["version"] in scores
    ]


def holder_of(records: list[dict], alias: str) -> int | None:
    """The version that holds `alias`, if any."""
    return next((r["version"] for r in records if alias in r["aliases"].split(",")), None)


def ranking(records: list[dict]) -> dict[int, tuple[int | None, str]]:
    """Version -> (its rank, or None; why it is not ranked). The versions scored on the same text as the reference
    (the champion, else the newest version with a score) are ranked by their score (`Candidate.score`: bits per
    byte, or for versions from before them, perplexity); the others are not, each with the reason."""
    candidates = {c.version: c for c in map(candidate, records)}
    scored = [c for c in candidates.values() if c.has_score()]
    champion = candidates.get(holder_of(records, "champion")) if any("aliases" in r for r in records) else None
    newest = max(scored, key=lambda c: c.version, default=None)
    reference = champion if champion is not None and champion.has_score() else newest
    if reference is None:
        return {v: (None, "no validation score") for v in candidates}
    pool = sorted((c for c in scored if c.data_key() == reference.data_key()), key=lambda c: (c.score, -c.version))
    ranks = {c.version: (i, "") for i, c in enumerate(pool, start=1)}
    for version, c in candidates.items():
        if version not in ranks:
            why = not_comparable(c, reference) if c.has_score() else "no validation score"
            ranks[version] = (None, f"not comparable with v{reference.version}: {why}" if c.has_score() else why)
    return ranks


def comparison_table(records: list[dict]) -> pd.DataFrame:
    """The records as a table: the versions of the reference's held-out text by rank (best first), then the others,
    newest first, with why they are not ranked."""
    ranks = ranking(records)
    rows = [{**r, "rank": ranks[r["version"]][0], "not_ranked": ranks[r["version"]][1]} for r in records]
    table = pd.DataFrame(rows, columns=COLUMNS)
    table = table.sort_values(["rank", "version"], ascending=[True, False], na_position="last")
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
