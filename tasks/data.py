"""Data tasks: fetch the corpus (retried, cached) and prepare tokens and vocab (cached by content and settings)."""

from __future__ import annotations

import hashlib
import json
import uuid
from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import TASK_SOURCE, CacheKeyFnPolicy

from rnnlm import experiment
from rnnlm.config import TrainConfig
from rnnlm.corpus import DownloadError, is_url, local_path


def _file_stamp(path: Path) -> list:
    """Identity of a file as it is now, so that an edited local corpus is read again."""
    return [str(path), path.stat().st_size, path.stat().st_mtime_ns] if path.is_file() else [str(path), None]


def _cache_generation(config: TrainConfig) -> str:
    """A token stored in the cache folder, made on first use. Deleting the folder (the way to clear the cache)
    changes it, so Prefect's cached results can never point at files that are gone."""
    marker = experiment.cache_dir(config) / "generation"
    if not marker.is_file():
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(uuid.uuid4().hex)
    return marker.read_text()


def _key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _fetch_key(context, parameters: dict) -> str:
    config: TrainConfig = parameters["config"]
    local = None if is_url(config.corpus) else _file_stamp(local_path(config.corpus))
    return _key("fetch", config.corpus, config.expected_sha1(), local, _cache_generation(config))


def _prepare_key(context, parameters: dict) -> str:
    config: TrainConfig = parameters["config"]
    settings = [getattr(config, name) for name in experiment.DATA_FIELDS]
    corpus = _file_stamp(Path(parameters["corpus_path"]))
    return _key("prepare", corpus, settings, _cache_generation(config))


def _is_network_error(task, task_run, state) -> bool:
    """Retry downloads that failed on the network; a wrong checksum or a missing file will not fix itself."""
    try:
        state.result()
    except DownloadError:
        return True
    except Exception:
        return False
    return False


@task(
    name="fetch-corpus",
    task_run_name="fetch-corpus",
    retries=3,
    retry_delay_seconds=[1, 2, 4],
    retry_condition_fn=_is_network_error,
    cache_policy=CacheKeyFnPolicy(cache_key_fn=_fetch_key) + TASK_SOURCE,
    persist_result=True,
)
def fetch_corpus(config: TrainConfig) -> str:
    """Download (or find) the corpus and verify its sha1; returns the local path."""
    path = experiment.fetch(config)
    get_run_logger().info("corpus %s at %s (%s bytes)", config.corpus, path, f"{path.stat().st_size:,}")
    return str(path)


@task(
    name="prepare-data",
    task_run_name="prepare-data-{config.tokenization}",
    cache_policy=CacheKeyFnPolicy(cache_key_fn=_prepare_key) + TASK_SOURCE,
    persist_result=True,
)
def prepare_data(corpus_path: str, config: TrainConfig) -> experiment.PreparedData:
    """Tokenize, build the vocab and split into train/validation token arrays on disk."""
    data = experiment.prepare_data(Path(corpus_path), config)
    logger = get_run_logger()
    logger.info(
        "vocab %d tokens; corpus %s tokens: %s for training, %s held out for validation",
        data.vocab_size,
        f"{data.num_tokens:,}",
        f"{data.train_tokens:,}",
        f"{data.val_tokens:,}",
    )
    if data.note:
        logger.warning(data.note)
    return data
