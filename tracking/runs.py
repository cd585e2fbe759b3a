"""Which MLflow run a training trains in: a new one, or the interrupted run of the same training, taken over.

A tracked run's resumable checkpoint lives at `rnnlm.checkpoint.run_checkpoint(config, corpus sha1, run id)`. The
training that trains a run holds a lock beside that checkpoint until `run_guard` ends, so two trainings never train
into the same run, whether they are two processes or two threads of one (sweep members on one worker), and a run whose
process died (even by `kill -9`) can be taken over by the next one.
"""

from __future__ import annotations

import functools
import os
import platform
import shutil
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from filelock import FileLock, Timeout
from mlflow.entities import RunStatus
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from rnnlm.checkpoint import best_checkpoint, checkpoint_folder, read_resumable, run_checkpoint
from rnnlm.config import TrainConfig
from rnnlm.data import PreparedData
from rnnlm.tokens import Vocab
from tracking import store

RESUMED_FROM_TAG = "rnnlm.resumed_from_run"
TRIAL_TAG = "tune.trial"  # on a search's trial run: only that trial's own retry (`resume_trial`) continues it


@dataclass(frozen=True)
class TrackedRun:
    """An MLflow run and, for a training run, the resumable checkpoint this process has claimed for it."""

    run_id: str
    checkpoint: str | None = None
    resumed_at_epoch: int = 0  # 0: a new training
    previous_status: str | None = None  # the status of the run taken over (None: a new MLflow run)
    continues: str | None = None  # the id of a run its checkpoint came from, which this store could not reopen

    def describe(self) -> str:
        """One line for the log: how this run began."""
        if not self.resumed_at_epoch:
            return f"MLflow run {self.run_id} started"
        if self.continues is None:
            return (
                f"resuming MLflow run {self.run_id} ({self.previous_status}) from its checkpoint at epoch "
                f"{self.resumed_at_epoch}: {self.checkpoint}"
            )
        return (
            f"MLflow run {self.continues} of checkpoint {self.checkpoint} cannot be continued in this store; "
            f"continuing its training from epoch {self.resumed_at_epoch} as run {self.run_id} (tag {RESUMED_FROM_TAG})"
        )

    @property
    def lock(self) -> Path | None:
        return None if self.checkpoint is None else lock_of(Path(self.checkpoint))


def lock_of(checkpoint: Path) -> Path:
    """The lock file that says which process trains the run of `checkpoint`."""
    return checkpoint.with_suffix(".lock")


def start_or_resume(config: TrainConfig, data: PreparedData, parent_run_id: str | None = None) -> TrackedRun:
    """The interrupted run of this same training when one left a checkpoint (same run id, metrics continue), else a
    new run (nested under `parent_run_id` when given) with every config value, the data's identity and the software
    versions as params. The returned run's checkpoint is locked by this process."""
    mlflow_client = store.client()
    if config.resume == "auto" and (resumed := _resumable_run(mlflow_client, config, data, parent_run_id)):
        return resumed
    run_id = new_run(mlflow_client, config, data, parent_run_id)
    checkpoint = run_checkpoint(config, data.corpus_sha1, run_id)
    try_lock(lock_of(checkpoint))
    return TrackedRun(run_id, str(checkpoint))


def new_run(mlflow_client: MlflowClient, config: TrainConfig, data: PreparedData, parent_run_id: str | None) -> str:
    """A new MLflow run of `config` on `data`, its params logged; returns its id."""
    tags = store.run_tags() | ({"mlflow.parentRunId": parent_run_id} if parent_run_id else {})
    created = mlflow_client.create_run(store.experiment_id(config.experiment), tags=tags)
    params = {**config.model_dump(mode="json"), **environment()}
    params |= {"corpus_file_sha1": data.corpus_sha1, "vocab_size": data.vocab_size, "git_commit": store.git_commit()}
    params |= {"train_tokens": data.train_tokens, "val_tokens_actual": data.val_tokens}
    mlflow_client.log_batch(created.info.run_id, params=[store.as_param(k, v) for k, v in params.items()])
    return created.info.run_id


def _resumable_run(
    mlflow_client: MlflowClient, config: TrainConfig, data: PreparedData, parent_run_id: str | None
) -> TrackedRun | None:
    """The newest checkpoint of this training whose process is gone and whose run did not finish, taken over (a
    search's stopped trial is left to its retry, even where a training of the same configuration comes first)."""
    folder = checkpoint_folder(config, data.corpus_sha1)
    found = folder.glob("*/model.pt") if folder.is_dir() else []
    for path in sorted(found, key=lambda p: p.stat().st_mtime, reverse=True):
        if claimed := _claim(mlflow_client, config, data, path, parent_run_id):
            return claimed
    return None


def resume_trial(config: TrainConfig, data: PreparedData, run_id: str, parent_run_id: str) -> TrackedRun | None:
    """The run `run_id` (a search's trial stopped with its search) taken over from its checkpoint, when it left one
    that no live process holds; else None."""
    path = run_checkpoint(config, data.corpus_sha1, run_id)
    return _claim(store.client(), config, data, path, parent_run_id, trial=True) if path.is_file() else None


def _claim(
    mlflow_client: MlflowClient,
    config: TrainConfig,
    data: PreparedData,
    path: Path,
    parent_run_id: str | None,
    trial: bool = False,
) -> TrackedRun | None:
    """The checkpoint at `path` taken over when no live process holds it and its run did not finish; a search's
    trial run only by that trial's retry (`trial`)."""
    if not try_lock(lock_of(path)):
        return None  # a live process is training that run right now
    status, tags = _run_state(mlflow_client, path.parent.name)
    if status == "FINISHED":  # its model is in MLflow; the local copy is no longer needed
        unlock(lock_of(path))
        shutil.rmtree(path.parent, ignore_errors=True)
        return None
    if TRIAL_TAG in tags and not trial:  # left for the stopped search's retry of that trial
        unlock(lock_of(path))
        return None
    try:
        epoch = read_resumable(path, config, Vocab.load(data.vocab_path), data.corpus_sha1)["epoch"]
        return _continue(mlflow_client, config, data, path, status, epoch, parent_run_id)
    except BaseException:
        unlock(lock_of(path))  # a refused checkpoint stays for the user to see; nobody holds it
        raise


def _run_state(mlflow_client: MlflowClient, run_id: str) -> tuple[str | None, dict[str, str]]:
    """The run's status (None when this store has no such undeleted run) and its tags (none when it has no such run)."""
    try:
        found = mlflow_client.get_run(run_id)
    except MlflowException:
        return None, {}
    return (found.info.status if found.info.lifecycle_stage == "active" else None), found.data.tags


def _continue(mlflow_client, config, data, path: Path, status: str | None, epoch: int, parent_run_id) -> TrackedRun:
    """Reopen the checkpoint's run; if this store cannot continue it, start a new run that records the link."""
    old_id = path.parent.name
    if status is not None:
        _reopen(mlflow_client, old_id, epoch)
        return TrackedRun(old_id, str(path), resumed_at_epoch=epoch, previous_status=status)
    new_id = new_run(mlflow_client, config, data, parent_run_id)
    mlflow_client.set_tag(new_id, RESUMED_FROM_TAG, old_id)
    mlflow_client.set_tag(new_id, "rnnlm.resumed_at_epoch", str(epoch))
    new_path = path.parent.with_name(new_id) / path.name
    new_path.parent.mkdir()
    try_lock(lock_of(new_path))
    if best_checkpoint(path).is_file():  # the best weights so far go with it: they may be the ones to register
        os.replace(best_checkpoint(path), best_checkpoint(new_path))
    os.replace(path, new_path)
    unlock(lock_of(path))
    shutil.rmtree(path.parent, ignore_errors=True)
    return TrackedRun(new_id, str(new_path), resumed_at_epoch=epoch, continues=old_id)


def _reopen(mlflow_client: MlflowClient, run_id: str, epoch: int) -> None:
    """Set the run RUNNING again, tagged with this flow run; its last failure reason moves to
    `rnnlm.previous_failure`."""
    mlflow_client.update_run(run_id, status="RUNNING")
    for key, value in store.run_tags().items():
        mlflow_client.set_tag(run_id, key, value)
    if reason := mlflow_client.get_run(run_id).data.tags.get("failure_reason"):
        mlflow_client.set_tag(run_id, "rnnlm.previous_failure", reason)
        mlflow_client.delete_tag(run_id, "failure_reason")
    mlflow_client.set_tag(run_id, "rnnlm.resumed_at_epoch", str(epoch))


def last_logged_epoch(run_id: str) -> int:
    """The last epoch whose training perplexity the run holds (0 for none): a resumed run logs after it."""
    return max((m.step for m in store.client().get_metric_history(run_id, "train_perplexity")), default=0)


@contextmanager
def run_guard(tracked: TrackedRun) -> Iterator[None]:
    """Mark the run FINISHED when the block succeeds; FAILED (or KILLED on Ctrl-C) with the reason as a tag if not.
    Either way, release this process's claim on the run's checkpoint so that a later run can resume it."""
    mlflow_client = store.client()
    try:
        yield
    except BaseException as err:
        status = RunStatus.KILLED if isinstance(err, KeyboardInterrupt) else RunStatus.FAILED
        mlflow_client.set_tag(tracked.run_id, "failure_reason", f"{type(err).__name__}: {err}"[:5000])
        mlflow_client.set_terminated(tracked.run_id, RunStatus.to_string(status))
        raise
    else:
        mlflow_client.set_terminated(tracked.run_id, "FINISHED")
    finally:
        if tracked.lock is not None:
            unlock(tracked.lock)


def environment() -> dict[str, str]:
    """Versions worth recording next to a run's numbers."""
    return {"torch_version": torch.__version__, "python_version": platform.python_version()}


# --- ownership of a run's checkpoint by one process --------------------------------------------------------------


def _lock(path: Path) -> FileLock:
    """This process's one lock object for `path`, which any of its tasks may take or release."""
    return _lock_at(str(Path(path).resolve()))


@functools.cache  # the object must live as long as the process may hold the lock: freeing it releases the lock
def _lock_at(resolved: str) -> FileLock:
    return FileLock(resolved, thread_local=False)


_CLAIMS = threading.Lock()  # makes "is it held? take it" one step for the threads of this process


def try_lock(path: Path) -> bool:
    """Take an exclusive lock on `path` without waiting; False if anyone holds it: another process, or another thread
    or task of this one (one claim per run, between threads as between processes).

    The operating system drops the lock when the process dies, even by `kill -9`, so a crashed run never blocks its
    own resumption.
    """
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    lock = _lock(path)
    with _CLAIMS:
        if lock.is_locked:  # this process holds it already, for another claim
            return False
        try:
            lock.acquire(timeout=0)
        except Timeout:
            return False
    return True


def unlock(path: Path) -> None:
    """Release the lock its holder took with `try_lock` (nothing happens if this process does not hold it)."""
    lock = _lock(path)
    with _CLAIMS:
        if lock.is_locked:
            lock.release()
