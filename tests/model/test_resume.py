"""Resuming training from checkpoints, in the library: exact continuation, refusals that say what differs."""

from __future__ import annotations

import os
import pickle
import signal
import threading
from dataclasses import replace

import pytest
import torch
from helpers import resume_settings

from rnnlm.checkpoint import CheckpointMismatch, checkpoint_folder, load_checkpoint, save_checkpoint
from rnnlm.config import TrainConfig
from rnnlm.data import prepare_data
from rnnlm.run import fit
from rnnlm.state import Hooks


def config_for(tmp_path, corpus, **overrides) -> TrainConfig:
    return TrainConfig(**resume_settings(tmp_path, corpus, **overrides))


@pytest.fixture
def prepared(tmp_path, small_corpus):
    def prepare(**overrides):
        config = config_for(tmp_path, small_corpus, **overrides)
        return config, prepare_data(small_corpus, config)

    return prepare


class StopAfter(Exception):
    """Raised from `on_epoch` to end a training abruptly, as a crash would (without a final checkpoint)."""


def stop_after(epoch: int):
    def on_epoch(stats, state):
        if stats.epoch == epoch:
            raise StopAfter

    return on_epoch


@pytest.mark.parametrize("use_random_iter", [False, True])
def test_resume_continues_exactly(tmp_path, prepared, use_random_iter):
    config, data = prepared(use_random_iter=use_random_iter, rnn="lstm")
    reference = fit(config, data, tmp_path / "reference.pt")

    path = tmp_path / "interrupted.pt"
    with pytest.raises(StopAfter):
        fit(config, data, path, Hooks(on_epoch=stop_after(5)))  # dies in epoch 5; last checkpoint: epoch 4
    assert load_checkpoint(path)["epoch"] == 4
    resumed_from = []
    result = fit(config, data, path, Hooks(on_resume=lambda state: resumed_from.append(state.epoch)))

    assert resumed_from == [4] and result.resumed_from_epoch == 4
    assert replace(result.history[-1], **_timings(reference.history[-1])) == reference.history[-1]
    for key in ("train_perplexity", "val_perplexity", "best_val_perplexity", "epochs"):
        assert getattr(result, key) == getattr(reference, key)  # exactly: every RNG, the optimizer and the weights
    ours, theirs = load_checkpoint(path)["model"], load_checkpoint(tmp_path / "reference.pt")["model"]
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


def _timings(stats) -> dict:
    return {k: getattr(stats, k) for k in ("tokens_per_sec", "seconds")}


def test_checkpoint_holds_everything_to_continue(tmp_path, prepared):
    config, data = prepared(num_epochs=3, checkpoint_every=1)
    fit(config, data, tmp_path / "c.pt", run_id="abc")
    ckpt = load_checkpoint(tmp_path / "c.pt")
    assert {"model", "optimizer", "epoch", "rng", "data_iterator", "best_val_perplexity", "config", "vocab"} <= set(
        ckpt
    )
    assert set(ckpt["rng"]) >= {"python", "numpy", "torch", "data"}
    assert (ckpt["epoch"], ckpt["run_id"], ckpt["corpus_sha1"]) == (3, "abc", data.corpus_sha1)
    assert [h["epoch"] for h in ckpt["history"]] == [1, 2, 3]
    assert [p.name for p in tmp_path.glob("*c.pt*")] == ["c.pt"]  # written atomically: no temporary file left


def test_resume_never_starts_over(tmp_path, prepared):
    config, data = prepared(num_epochs=2)
    fit(config, data, tmp_path / "c.pt")
    result = fit(config.model_copy(update={"resume": "never"}), data, tmp_path / "c.pt")
    assert result.resumed_from_epoch == 0 and len(result.history) == 2


@pytest.mark.parametrize(
    "change, message",
    [
        ({"num_hiddens": 32}, "num_hiddens: checkpoint 24, this run 32"),
        ({"lr": 0.5}, "lr: checkpoint 1.0, this run 0.5"),
    ],
)
def test_checkpoint_of_another_config_is_refused(tmp_path, prepared, change, message):
    config, data = prepared(num_epochs=2)
    fit(config, data, tmp_path / "c.pt")
    other, _ = prepared(num_epochs=2, **change)
    with pytest.raises(CheckpointMismatch, match=message) as err:
        fit(other, data, tmp_path / "c.pt")
    assert "--resume never" in str(err.value)


def test_checkpoint_of_another_vocab_or_corpus_is_refused(tmp_path, prepared):
    config, data = prepared(num_epochs=2)
    fit(config, data, tmp_path / "c.pt")
    ckpt = load_checkpoint(tmp_path / "c.pt")
    ckpt["vocab"] = [ckpt["vocab"][0], *reversed(ckpt["vocab"][1:])]
    save_checkpoint(tmp_path / "v.pt", **{k: v for k, v in ckpt.items() if k != "format_version"})
    with pytest.raises(CheckpointMismatch, match="vocab: token 1 is"):
        fit(config, data, tmp_path / "v.pt")
    ckpt = load_checkpoint(tmp_path / "c.pt")
    save_checkpoint(tmp_path / "s.pt", **{**ckpt, "corpus_sha1": "0" * 40, "format_version": 2})
    with pytest.raises(CheckpointMismatch, match="corpus_file_sha1: checkpoint '0000"):
        fit(config, data, tmp_path / "s.pt")


def test_checkpoint_folder_is_keyed_by_what_is_trained(tmp_path, prepared):
    config, data = prepared()
    folder = checkpoint_folder(config, data.corpus_sha1)
    same = config.model_copy(update={"progress_every": 3, "checkpoint_every": 1, "num_preds": 5, "experiment": "x"})
    assert checkpoint_folder(same, data.corpus_sha1) == folder
    # when evaluations run decides the best weights kept, the plateau schedule and early stopping: part of a training
    changes = ({"seed": 1}, {"num_epochs": 7}, {"rnn": "gru"}, {"use_random_iter": True}, {"eval_every": 3})
    for change in changes:
        assert checkpoint_folder(config.model_copy(update=change), data.corpus_sha1) != folder
    assert checkpoint_folder(config, "f" * 40) != folder


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_resume_refuses_a_checkpoint_with_pickled_code(tmp_path, prepared, monkeypatch):
    config, data = prepared(num_epochs=2)
    monkeypatch.chdir(tmp_path)
    torch.save({"model": {}, "rng": _Exploit()}, tmp_path / "evil.pt", pickle_module=pickle)
    with pytest.raises(ValueError, match="weights_only"):
        fit(config, data, tmp_path / "evil.pt")
    assert not (tmp_path / "pwned").exists()


@pytest.mark.skipif(threading.current_thread() is not threading.main_thread(), reason="signals need the main thread")
def test_ctrl_c_stops_after_the_minibatch_with_a_checkpoint_and_resumes_exactly(tmp_path, prepared):
    config, data = prepared(num_epochs=6, checkpoint_every=100)

    def interrupt_at_epoch_3(stats, state):
        if stats.epoch == 3:
            os.kill(os.getpid(), signal.SIGINT)  # a real SIGINT, as Ctrl-C sends

    with pytest.raises(KeyboardInterrupt, match="interrupted in epoch 4 after step"):
        fit(config, data, tmp_path / "c.pt", Hooks(on_epoch=interrupt_at_epoch_3))
    saved = load_checkpoint(tmp_path / "c.pt")
    assert (saved["epoch"], saved["batch"]) == (3, 1)  # the first minibatch of epoch 4 done, then the checkpoint
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # Ctrl-C behaves as usual again
    reference = fit(config, data, tmp_path / "ref.pt")
    resumed = fit(config, data, tmp_path / "c.pt")
    assert resumed.resumed_from_epoch == 3 and resumed.train_perplexity == reference.train_perplexity
    assert resumed.val_perplexity == reference.val_perplexity and resumed.steps == reference.steps


def test_a_checkpoint_keeps_every_field_of_the_training_state():
    """The saved state is TrainState's own field list: a field added there is saved and resumed without a copy."""
    from dataclasses import fields

    from rnnlm.checkpoint import state_to_checkpoint
    from rnnlm.state import TrainState

    saved = state_to_checkpoint(TrainState(epoch=2, step=9, lr=0.25, stale_evals=1))
    assert {f.name for f in fields(TrainState)} <= saved.keys()
    assert (saved["epoch"], saved["step"], saved["lr"], saved["stale_evals"]) == (2, 9, 0.25, 1)


def test_a_checkpoint_from_before_an_option_existed_resumes_with_the_option_at_its_default(tmp_path, prepared):
    config, data = prepared(num_epochs=2)
    fit(config, data, tmp_path / "c.pt")
    ckpt = load_checkpoint(tmp_path / "c.pt")
    del ckpt["config"]["mask_unseen"]  # as a checkpoint written before the option came
    save_checkpoint(tmp_path / "old.pt", **{k: v for k, v in ckpt.items() if k != "format_version"})
    assert fit(config, data, tmp_path / "old.pt").resumed_from_epoch == 2
    with pytest.raises(CheckpointMismatch, match="mask_unseen: checkpoint False, this run True"):
        fit(config.model_copy(update={"mask_unseen": True}), data, tmp_path / "old.pt")
