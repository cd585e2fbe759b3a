"""Data tasks: fetch the corpus (retried on network errors) and prepare its tokens and vocab.

Both are cached by the library itself, by content: a downloaded corpus is reused while its sha1 matches, prepared
data while the corpus and the data settings are the same (`rnnlm.data`); deleting `.cache/` clears both.
"""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

import rnnlm.data
from rnnlm.config import TrainConfig
from rnnlm.download import DownloadError
from tracking.retries import retry_if


@task(
    name="fetch-corpus",
    task_run_name="fetch-corpus",
    retries=3,
    retry_delay_seconds=[1, 2, 4],
    retry_condition_fn=retry_if(lambda err: isinstance(err, DownloadError)),  # a bad sha1 will not fix itself
    cache_policy=NO_CACHE,
)
def fetch_corpus(config: TrainConfig) -> str:
    """Download (or find) the corpus and verify its sha1; returns the local path."""
    path = rnnlm.data.fetch(config)
    get_run_logger().info("corpus %s at %s (%s bytes)", config.corpus, path, f"{path.stat().st_size:,}")
    return str(path)


@task(name="prepare-data", task_run_name="prepare-data-{config.tokenization}", cache_policy=NO_CACHE)
def prepare_data(corpus_path: str, config: TrainConfig) -> rnnlm.data.PreparedData:
    """Tokenize, build the vocab and split into train/validation token arrays on disk (or find them there)."""
    data = rnnlm.data.prepare_data(Path(corpus_path), config)
    logger = get_run_logger()
    logger.info(
        "vocab %d tokens; corpus %s tokens: %s for training, %s held out for validation%s",
        data.vocab_size,
        f"{data.num_tokens:,}",
        f"{data.train_tokens:,}",
        f"{data.val_tokens:,}",
        f" (prepared before: {data.folder})" if data.reused else "",
    )
    if data.note:
        logger.warning(data.note)
    return data
