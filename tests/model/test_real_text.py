"""What training on real text needs, in the library: embeddings, dropout and tied weights, the schedules, early
stopping and the best weights kept, three splits, evaluations and checkpoints inside epochs, progress lines."""

from __future__ import annotations

import copy
import itertools
import math
import os
import pickle
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import CUDA, PROJECT_ROOT, resume_settings, small_text

from rnnlm import cpu
from rnnlm import train as train_module
from rnnlm.batches import DataError
from rnnlm.checkpoint import best_checkpoint, load_checkpoint, model_from_checkpoint, save_checkpoint
from rnnlm.config import TrainConfig
from rnnlm.data import prepare_data
from rnnlm.evaluate import evaluate
from rnnlm.generate import generate
from rnnlm.model import RNNLM, build_model
from rnnlm.run import fit
from rnnlm.state import Hooks
from rnnlm.tokens import build_vocab, encode, prepare_text
from rnnlm.train import make_optimizer, train

# A word-level model as a real recipe has it, small: embeddings, dropout, two layers
WORDS = dict(tokenization="word", preprocess="words", embedding_dim=24, dropout=0.1, lr=20.0, grad_clip=0.25)


@pytest.fixture
def words(tmp_path):
    """A 6,000-word made-up corpus and a config maker for word-level runs on it (val 500, test 500 words)."""
    path = tmp_path / "words.txt"
    path.write_text(small_text(6000))

    def config(**overrides) -> TrainConfig:
        settings = WORDS | dict(val_tokens=500, test_tokens=500, eval_every=1) | overrides
        return TrainConfig(**resume_settings(tmp_path, path, **settings))

    return path, config


@pytest.mark.parametrize("rnn", ["rnn", "gru", "lstm"])
def test_dropout_is_off_in_evaluation_and_generation(rnn):
    torch.manual_seed(0)
    model = RNNLM(30, 16, rnn, num_layers=2, embedding_dim=8, dropout=0.5)
    tokens = torch.randint(0, 30, (4, 12))
    model.train()
    first, _ = model(tokens, model.begin_state(4))
    second, _ = model(tokens, model.begin_state(4))
    assert not torch.equal(first, second)  # dropout is on while training
    model.eval()
    first, _ = model(tokens, model.begin_state(4))
    second, _ = model(tokens, model.begin_state(4))
    assert torch.equal(first, second)
    ids = torch.randint(0, 30, (400,))
    assert evaluate(model, ids, 4, 10) == evaluate(model, ids, 4, 10)
    vocab = build_vocab(" ".join(f"w{i}" for i in range(29)), "word")
    model.train()  # generation switches dropout off by itself
    assert generate(model, vocab, ["w1 w2"], 20, "word") == generate(model, vocab, ["w1 w2"], 20, "word")


def test_tied_weights_share_one_tensor_through_training_and_checkpoints(tmp_path):
    text = prepare_text(small_text(1500), "words", "word")
    vocab = build_vocab(text, "word")
    ids = encode(text, vocab, "word")
    torch.manual_seed(0)
    model = RNNLM(len(vocab), 16, "lstm", embedding_dim=16, tie_weights=True)
    assert model.linear.weight is model.embedding.weight
    assert len(list(model.parameters())) == len(list(RNNLM(len(vocab), 16, "lstm", embedding_dim=16).parameters())) - 1
    config = TrainConfig(rnn="lstm", batch_size=4, num_steps=10, num_epochs=2, lr=1.0, val_tokens=0, tie_weights=True,
                         embedding_dim=16, num_hiddens=16)  # fmt: skip
    before = model.embedding.weight.detach().clone()
    train(model, ids[:-100], ids[-100:], config, make_optimizer(model, 1.0), torch.Generator().manual_seed(0))
    assert model.linear.weight is model.embedding.weight and not torch.equal(model.embedding.weight, before)
    save_checkpoint(tmp_path / "t.pt", model=model.state_dict(), config=config.model_dump(mode="json"),
                    vocab=vocab.tokens)  # fmt: skip
    loaded, _, _ = model_from_checkpoint(load_checkpoint(tmp_path / "t.pt"))
    assert loaded.linear.weight is loaded.embedding.weight and torch.equal(loaded.linear.weight, model.linear.weight)


@pytest.mark.parametrize(
    "options, names",
    [
        ({"tie_weights": True, "embedding_dim": 100}, ["tie_weights", "embedding_dim"]),
        ({"early_stopping": 3, "val_tokens": 0}, ["early_stopping", "val_tokens"]),
        ({"lr_schedule": "plateau", "val_tokens": 0}, ["plateau", "val_tokens"]),
    ],
)
def test_option_combinations_that_cannot_work_are_refused_naming_them(options, names):
    with pytest.raises(ValueError) as refused:
        TrainConfig(**options)
    assert all(name in str(refused.value) for name in names)


def test_plateau_divides_the_rate_and_resume_restores_it(tmp_path, words):
    path, make = words
    config = make(num_layers=2, rnn="lstm", lr_schedule="plateau", num_epochs=6, checkpoint_every=2)
    data = prepare_data(path, config)
    reference = fit(config, data, tmp_path / "reference.pt")
    rates, best, lr = [], math.inf, config.lr
    for stats in reference.history:  # every evaluation that does not beat the best divides the rate by lr_decay
        lr = lr if stats.val_perplexity < best else lr / config.lr_decay
        best = min(best, stats.val_perplexity)
        rates.append(lr)
    assert [s.lr for s in reference.history] == pytest.approx(rates)
    assert rates[-1] < config.lr  # it did divide (the small corpus stops improving quickly)

    class Crash(Exception):
        pass

    def crash_after(epoch: int):
        def on_epoch(stats, state):
            if stats.epoch == epoch:
                raise Crash

        return on_epoch

    first_cut = next(i for i, rate in enumerate(rates) if rate < config.lr) + 1  # the epoch of the first division
    crash_at = first_cut + 1 + (first_cut + 1) % 2  # an odd epoch after it: the last checkpoint is the epoch before
    with pytest.raises(Crash):
        fit(config, data, tmp_path / "cut.pt", Hooks(on_epoch=crash_after(crash_at)))
    saved = load_checkpoint(tmp_path / "cut.pt")
    assert saved["lr"] == pytest.approx(rates[saved["epoch"] - 1]) and saved["lr"] < config.lr
    resumed = fit(config, data, tmp_path / "cut.pt")
    assert resumed.resumed_from_epoch == saved["epoch"]
    assert [s.lr for s in resumed.history] == [s.lr for s in reference.history]
    assert resumed.val_perplexity == reference.val_perplexity and resumed.train_perplexity == reference.train_perplexity


def test_early_stopping_stops_and_keeps_the_best_weights(tmp_path, words):
    path, make = words
    config = make(rnn="gru", num_hiddens=32, embedding_dim=32, tie_weights=True, dropout=0.3, lr=5.0,
                  num_epochs=30, early_stopping=2)  # fmt: skip
    data = prepare_data(path, config)
    result = fit(config, data, tmp_path / "m.pt")
    vals = [s.val_perplexity for s in result.history]
    assert result.epochs < config.num_epochs and "early stopping" in result.stopped
    assert vals[-2:] > [min(vals)] * 2 and min(vals) not in vals[-2:]  # two evaluations without a better one
    assert result.registered == "best" and result.registered_checkpoint == str(best_checkpoint(tmp_path / "m.pt"))
    assert result.registered_epoch == vals.index(min(vals)) + 1 and result.registered_epoch < result.epochs
    assert result.registered_val_perplexity == pytest.approx(min(vals), rel=1e-9) == result.best_val_perplexity
    assert result.val_perplexity == pytest.approx(vals[-1], rel=1e-9) != result.registered_val_perplexity
    best, last = load_checkpoint(result.registered_checkpoint), load_checkpoint(result.checkpoint)
    assert (best["epoch"], best["val_perplexity"]) == (result.registered_epoch, result.best_val_perplexity)
    assert not torch.equal(best["model"]["linear.weight"], last["model"]["linear.weight"])


def test_registering_the_last_weights_evaluates_those(tmp_path, words):
    path, make = words
    config = make(num_epochs=3, register_weights="last")
    result = fit(config, prepare_data(path, config), tmp_path / "m.pt")
    assert (result.registered, result.registered_checkpoint, result.registered_epoch) == ("last", result.checkpoint, 3)
    assert result.registered_val_perplexity == result.val_perplexity


def test_three_splits_are_disjoint_and_test_is_the_corpus_end(tmp_path, words):
    path, make = words
    config = make(max_tokens=-1, val_tokens=700, test_tokens=400)
    data = prepare_data(path, config)
    vocab, train_ids, val_ids = data.load()
    test_ids = data.load_test()
    ids = encode(prepare_text(path.read_text(), "words", "word"), vocab, "word")
    n = len(ids)
    assert (
        (len(train_ids), len(val_ids), len(test_ids))
        == (n - 1100, 700, 400)
        == (data.train_tokens, data.val_tokens, data.test_tokens)
    )
    assert np.array_equal(np.concatenate([train_ids, val_ids, test_ids]), ids)  # in order, each token in one split
    short = make(max_tokens=1000, val_tokens=700, test_tokens=400)
    small = prepare_data(path, short)
    _, train_ids, val_ids = small.load()
    assert np.array_equal(train_ids, ids[:1000]) and np.array_equal(val_ids, ids[n - 1100 : n - 400])
    assert np.array_equal(small.load_test(), ids[n - 400 :])


@pytest.mark.parametrize("tokenization, test_tokens", [("char", 0), ("word", 400)])
def test_bits_per_token_match_the_perplexity(tmp_path, words, tokenization, test_tokens):
    path, make = words
    # lr 1: at WORDS' lr 20 two epochs on this text are chaotic (test perplexity 30 or 47 from float rounding alone)
    options = {"embedding_dim": 0, "preprocess": "book", "grad_clip": 1.0} if tokenization == "char" else {}
    config = make(tokenization=tokenization, num_epochs=2, test_tokens=test_tokens, lr=1.0, **options)
    result = fit(config, prepare_data(path, config), tmp_path / "m.pt")
    held_out = result.registered_test_perplexity if test_tokens else result.registered_val_perplexity
    assert (result.registered_test_perplexity is None) == (test_tokens == 0)
    assert result.registered_bits_per_token == pytest.approx(math.log2(held_out), rel=1e-12)
    assert 0 < result.registered_bits_per_token < math.log2(prepare_data(path, config).vocab_size) + 1


def _ticking(monkeypatch, seconds: float) -> None:
    """The training loop's clock under the test's control: each reading is `seconds` later than the one before."""
    readings = itertools.count()
    monkeypatch.setattr(train_module, "clock", lambda: next(readings) * seconds)


def test_progress_lines_inside_epochs_and_evaluations_by_steps(tmp_path, words, monkeypatch):
    path, make = words
    config = make(num_epochs=2, progress_every=20, eval_every_steps=25, val_max_tokens=200)
    data = prepare_data(path, config)
    lines = []
    _ticking(monkeypatch, 1.0)  # a second per step, and per evaluation
    result = fit(config, data, tmp_path / "m.pt", Hooks(on_progress=lambda state, values: lines.append(dict(values))))
    per_epoch = result.steps // 2
    assert [(v["epoch"], v["batch"]) for v in lines] == [(e, b) for e in (1, 2) for b in range(20, per_epoch + 1, 20)]
    assert all(v["tokens_per_sec"] > 0 and v["epoch_eta_seconds"] >= 0 and v["batches"] == per_epoch for v in lines)
    # the ETA is the batches left at the seconds per batch so far: 1 s at batch 20, a little more by 40 (the clock
    # reading that started the evaluation at step 25 counts as training)
    assert lines[0]["epoch_eta_seconds"] == per_epoch - 20
    assert lines[1]["epoch_eta_seconds"] == pytest.approx((per_epoch - 40) * 41 / 40)
    assert lines[-1]["val_perplexity"] is not None  # an evaluation by steps has run by then
    # the evaluations during training used 200 validation tokens; the final numbers all 500 of them
    _, _, val_ids = data.load()
    model, _, _ = model_from_checkpoint(load_checkpoint(result.checkpoint))
    full = evaluate(model, torch.as_tensor(np.asarray(val_ids, dtype=np.int64)), config.batch_size, config.num_steps)
    assert result.val_perplexity == pytest.approx(full, rel=1e-9)


@pytest.mark.parametrize("schedule", ["cosine", "constant"])
def test_cosine_warms_up_then_decays_to_lr_min_and_adamw_trains(tmp_path, words, schedule):
    path, make = words
    config = make(
        num_epochs=3,
        lr_schedule=schedule,
        warmup_steps=10,
        lr_min=0.01,
        optimizer="adamw",
        lr=0.01 * 30,
        progress_every=10,
    )
    seen = []
    result = fit(config, prepare_data(path, config), tmp_path / "m.pt",
                 Hooks(on_progress=lambda state, values: seen.append(values["lr"])))  # fmt: skip
    if schedule == "cosine":
        assert result.history[-1].lr == pytest.approx(0.01, rel=0.05) and max(seen) <= config.lr
        assert result.history[0].lr > result.history[1].lr > result.history[2].lr
    else:
        assert {s.lr for s in result.history} == {config.lr}
    assert result.history[-1].train_perplexity < result.history[0].train_perplexity


def test_adamw_updates_all_weights_in_one_fused_kernel_as_torchs_loop_would():
    """The fused AdamW (one kernel for every parameter) takes torch's per-tensor AdamW steps, to float rounding."""
    config = TrainConfig(optimizer="adamw", lr=0.01, weight_decay=0.1, num_hiddens=16)
    torch.manual_seed(0)
    model, reference = RNNLM(30, 16, "lstm", 2, embedding_dim=16), RNNLM(30, 16, "lstm", 2, embedding_dim=16)
    reference.load_state_dict(model.state_dict())
    initial = [p.detach().clone() for p in model.parameters()]
    fused, loop = (
        make_optimizer(model, config.lr, config),
        torch.optim.AdamW(reference.parameters(), lr=0.01, weight_decay=0.1, foreach=False),
    )
    assert fused.defaults["fused"] and not loop.defaults["fused"]
    for _ in range(5):
        for a, b in zip(model.parameters(), reference.parameters(), strict=True):
            a.grad = torch.randn_like(a)
            b.grad = a.grad.clone()
        fused.step(), loop.step()
    for a, b, before in zip(model.parameters(), reference.parameters(), initial, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        assert not torch.equal(a, before)


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("scale", [1e-4, 30.0, math.nan], ids=["unclipped", "clipped", "nan"])
def test_adamw_takes_the_clip_inside_its_step_as_clip_grad_norm_then_step_would(scale, device):
    """clip_and_step: a fused AdamW takes the clip's factor as its grad_scale: the weights, gradients and state of
    torch's clip_grad_norm_ then step, to float32 rounding; a NaN gradient still gives NaN weights. (SGD's step is
    torch's own: test_regularisers.py's test_off_training_is_the_plain_loop.)"""
    config = TrainConfig(optimizer="adamw", lr=0.01, weight_decay=0.1, num_hiddens=16)
    torch.manual_seed(0)
    model, reference = RNNLM(30, 16, "lstm", 2, embedding_dim=16), RNNLM(30, 16, "lstm", 2, embedding_dim=16)
    reference.load_state_dict(model.state_dict())
    model, reference = model.to(device), reference.to(device)
    ours, theirs = make_optimizer(model, config.lr, config), make_optimizer(reference, config.lr, config)
    assert ours.defaults["fused"]  # torch's fused kernel, on the CPU as on a GPU
    for _ in range(3):
        for a, b in zip(model.parameters(), reference.parameters(), strict=True):
            a.grad = torch.randn_like(a) * scale
            b.grad = a.grad.clone()
        train_module.clip_and_step(model, ours, max_norm=1.0)
        torch.nn.utils.clip_grad_norm_(reference.parameters(), 1.0, foreach=True)
        theirs.step()
    assert not hasattr(ours, "grad_scale")  # nothing left behind for a later step
    for a, b in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, equal_nan=True)
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=0, equal_nan=True)
        torch.testing.assert_close(ours.state[a]["exp_avg_sq"], theirs.state[b]["exp_avg_sq"], equal_nan=True)
    assert math.isnan(scale) == bool(torch.isnan(next(model.parameters())).all())


def test_adamw_state_too_small_to_move_a_weight_is_zeroed_before_it_turns_subnormal():
    """zero_tiny_state: AdamW's running means below 1e-30 (a word unseen for ~600 steps: 0.9 a step) become zero, the
    rest stays bit for bit, and the next steps give the same weights as with those means kept (subnormal by then)."""
    torch.manual_seed(0)
    model = RNNLM(30, 16, "lstm", embedding_dim=16)
    config = TrainConfig(optimizer="adamw", lr=0.004, weight_decay=0.15)
    kept = make_optimizer(model, config.lr, config)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    kept.step()
    mean = kept.state[model.embedding.weight]["exp_avg"]
    mean[20:] = torch.rand(10, 16) * 1e-31 + 1e-37  # the rows of words not seen since
    before = copy.deepcopy(kept.state_dict())
    twin = copy.deepcopy(model)
    zeroed = make_optimizer(twin, config.lr, config)
    zeroed.load_state_dict(before)
    train_module.zero_tiny_state(zeroed)
    zeroed_mean = zeroed.state[twin.embedding.weight]["exp_avg"]
    assert (zeroed_mean[20:] == 0).all() and torch.equal(zeroed_mean[:20], mean[:20])
    after = zeroed.state_dict()["state"]
    for index, state in before["state"].items():  # nothing else is this small
        assert index == 0 or all(torch.equal(after[index][key], value) for key, value in state.items())
    for _ in range(200):  # the kept means go subnormal (below 1.2e-38) within these steps
        for a, b in zip(model.parameters(), twin.parameters(), strict=True):
            a.grad = torch.randn_like(a) * 1e-3
            if a is model.embedding.weight:
                a.grad[20:] = 0
            b.grad = a.grad.clone()
        kept.step(), zeroed.step()
    assert 0 < mean[20:].abs().max() < torch.finfo(torch.float32).tiny
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(a, b)


def test_training_zeroes_tiny_optimizer_state_every_hundred_steps():
    """The trainer runs zero_tiny_state after every 100th step: a tiny value put into AdamW's state after each step
    is gone after steps 100, 200, ... and kept after the others."""
    text = prepare_text(small_text(600), "book", "char")
    vocab = build_vocab(text, "char")
    ids = np.asarray(encode(text, vocab, "char"), dtype=np.int64)
    model = RNNLM(len(vocab), 16, "lstm")
    config = TrainConfig(batch_size=8, num_steps=10, optimizer="adamw", lr=0.01, grad_clip=1.0, num_epochs=8)
    optimizer = make_optimizer(model, config.lr, config)
    weight, seen = next(model.parameters()), []
    optimizer.register_step_post_hook(lambda *_: optimizer.state[weight]["exp_avg"].view(-1).__setitem__(0, 1e-37))

    def before_step(*_) -> None:
        if "exp_avg" in optimizer.state[weight]:
            seen.append(optimizer.state[weight]["exp_avg"].view(-1)[0].item())

    optimizer.register_step_pre_hook(before_step)
    train(model, ids, ids[:0], config, optimizer, torch.Generator().manual_seed(0))
    assert len(seen) > 2 * train_module.TINY_EVERY  # seen[k - 1]: the state after step k
    every = train_module.TINY_EVERY
    assert [step for step, value in enumerate(seen, 1) if value == 0] == list(range(every, len(seen) + 1, every))


def test_max_minutes_stops_and_registers_what_there_is(tmp_path, words, monkeypatch):
    path, make = words
    config = make(num_epochs=1000, max_minutes=0.02, progress_every=5)
    lines = []
    _ticking(monkeypatch, 0.01)  # the budget (1.2 s) is 120 readings of the loop's clock: fewer than 120 steps
    result = fit(config, prepare_data(path, config), tmp_path / "m.pt", Hooks(on_progress=lambda s, v: lines.append(v)))
    assert result.steps < 120 and result.epochs < 1000
    assert "time budget" in result.stopped and result.registered_val_perplexity is not None
    # the progress lines' ETA and share done follow the budget, not the 1,000 epochs
    assert lines and all(v["run_eta_seconds"] <= 60 * 0.02 for v in lines)
    done = [v["run_done"] for v in lines]
    assert done == sorted(done) and 0 < done[0] and done[-1] <= 1 and done[-1] > 10 / 1000


KILLED_TRAINING = """
import sys, threading
sys.path.insert(0, {root!r})
from rnnlm.config import TrainConfig
from rnnlm.data import prepare_data
from rnnlm.run import fit
from rnnlm.state import Hooks
import torch
torch.set_num_threads(1)
config = TrainConfig.model_validate_json(sys.argv[1])

def stop_inside_the_second_epoch(state, values):  # once a checkpoint inside it is written: say so, wait to be killed
    if state.epoch >= 1 and state.batch > 0 and state.step % config.checkpoint_every_steps == 0:
        print("checkpointed", flush=True)
        threading.Event().wait()

fit(config, prepare_data(config.corpus, config), sys.argv[2], Hooks(on_progress=stop_inside_the_second_epoch))
"""


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_kill_9_inside_an_epoch_then_rerun_ends_identical(tmp_path, words, optimizer):
    path, make = words
    config = make(num_layers=2, rnn="lstm", num_epochs=3, lr_schedule="plateau", eval_every_steps=30,
                  checkpoint_every_steps=7, progress_every=1, optimizer=optimizer,
                  **({"lr": 0.01} if optimizer == "adamw" else {}))  # fmt: skip
    data = prepare_data(path, config)
    reference = fit(config, data, tmp_path / "reference.pt")
    checkpoint = tmp_path / "killed" / "model.pt"
    checkpoint.parent.mkdir()
    script = KILLED_TRAINING.format(root=str(PROJECT_ROOT))
    command = [sys.executable, "-c", script, config.model_dump_json(), str(checkpoint)]
    child = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    try:
        said = child.stdout.readline()  # "" if it ended first
        assert said == "checkpointed\n", "the training ended before a checkpoint inside its second epoch"
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
    saved = load_checkpoint(checkpoint)
    assert saved["batch"] > 0 and saved["epoch"] < 3  # the last checkpoint is inside an epoch
    resumed = fit(config, data, checkpoint)
    assert resumed.resumed_from_epoch == saved["epoch"]
    assert [s.train_perplexity for s in resumed.history] == [s.train_perplexity for s in reference.history]
    assert [s.val_perplexity for s in resumed.history] == [s.val_perplexity for s in reference.history]
    assert (resumed.registered_epoch, resumed.registered_step) == (
        reference.registered_epoch,
        reference.registered_step,
    )
    assert resumed.registered_test_perplexity == reference.registered_test_perplexity
    ours, theirs = load_checkpoint(checkpoint)["model"], load_checkpoint(reference.checkpoint)["model"]
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


@pytest.mark.parametrize("tied", [False, True])
def test_the_adaptive_softmax_is_torchs_and_its_loss_reads_only_the_targets_clusters(tied):
    """The model's adaptive softmax gives torch's AdaptiveLogSoftmaxWithLoss's log-probabilities and loss with the
    same weights (the head's word rows the embedding's own when tied), normalised, with the loss from the head and
    each target's cluster equal to the full log-probabilities' cross-entropy."""
    torch.manual_seed(0)
    model = RNNLM(40, 32, "gru", embedding_dim=32, tie_weights=tied, adaptive_cutoffs=[10, 25])
    out = model.adaptive
    theirs = torch.nn.AdaptiveLogSoftmaxWithLoss(32, 40, [10, 25], div_value=4.0, head_bias=True)
    with torch.no_grad():
        words = model.embedding.weight[:10] if tied else out.words
        theirs.head.weight.copy_(torch.cat([words, out.clusters]))
        theirs.head.bias.copy_(out.head_bias)
        for mine, its in zip(out.tails, theirs.tail, strict=True):
            for a, b in zip(mine, its, strict=True):
                b.weight.copy_(a.weight)
    hs, targets = torch.randn(50, 32), torch.cat([torch.arange(40), torch.randint(0, 40, (10,))])
    log_probs = out(hs)
    assert log_probs.shape == (50, 40)
    torch.testing.assert_close(log_probs.exp().sum(1), torch.ones(50))
    torch.testing.assert_close(log_probs, theirs.log_prob(hs))
    torch.testing.assert_close(out.loss(hs, targets), theirs(hs, targets).loss)
    summed = torch.nn.functional.nll_loss(log_probs, targets, reduction="sum")
    torch.testing.assert_close(out.loss(hs, targets, "sum"), summed)
    names = [name for name, _ in model.named_parameters()]
    assert ("adaptive.words" in names) != tied and "embedding.weight" in names and model.linear is None
    if tied:  # the loss trains the embedding's rows through the head
        model.zero_grad()
        out.loss(hs, targets).backward()
        assert model.embedding.weight.grad[:10].abs().sum() > 0


@pytest.mark.parametrize("engine", [True, False])
def test_the_adaptive_softmax_loss_gives_torchs_gradients(monkeypatch, engine):
    """The adaptive softmax's loss sends back the gradients of torch's AdaptiveLogSoftmaxWithLoss with the same
    weights, to the hidden states and every weight (the tied embedding's head rows included); on a CPU with the
    kernels its head's cross-entropy runs in C (fused.OutputLoss), elsewhere on torch's ops."""
    monkeypatch.setattr(cpu, "ENABLED", engine)
    torch.manual_seed(0)
    model = RNNLM(300, 32, "gru", embedding_dim=32, tie_weights=True, adaptive_cutoffs=[100, 200])
    out = model.adaptive
    theirs = torch.nn.AdaptiveLogSoftmaxWithLoss(32, 300, [100, 200], div_value=4.0, head_bias=True)
    with torch.no_grad():
        theirs.head.weight.copy_(torch.cat([model.embedding.weight[:100], out.clusters]))
        theirs.head.bias.copy_(out.head_bias)
        for mine, its in zip(out.tails, theirs.tail, strict=True):
            for a, b in zip(mine, its, strict=True):
                b.weight.copy_(a.weight)
    hs, targets = torch.randn(80, 32, requires_grad=True), torch.randint(0, 300, (80,))
    loss = out.loss(hs, targets)
    ours = torch.autograd.grad(loss, [hs, model.embedding.weight, out.clusters, out.head_bias, *out.tails.parameters()])
    theirs_loss = theirs(hs, targets).loss
    expected = torch.autograd.grad(theirs_loss, [hs, theirs.head.weight, theirs.head.bias, *theirs.tail.parameters()])
    torch.testing.assert_close(loss, theirs_loss)
    head_weight = torch.cat([ours[1][:100], ours[2]])
    for got, want in zip([ours[0], head_weight, *ours[3:]], expected, strict=True):
        torch.testing.assert_close(got, want)
    assert ours[1][100:].abs().sum() == 0  # the embedding's other rows: no gradient from the output layer
    nodes, fused_head = [loss.grad_fn], False
    while nodes:
        node = nodes.pop()
        fused_head |= type(node).__name__ == "OutputLossBackward"
        nodes.extend(next_node for next_node, _ in node.next_functions if next_node is not None)
    assert fused_head == cpu.compiled()


def test_an_adaptive_model_trains_checkpoints_and_generates(tmp_path, words):
    """An adaptive softmax through a whole run: it learns about as well as the full softmax, its checkpoint rebuilds
    the same model (the registered weights' perplexity again), and it generates."""
    path, make = words
    config = make(rnn="gru", num_epochs=4, embedding_dim=24, num_hiddens=24, tie_weights=True, adaptive_cutoffs=[4, 10],
                  adaptive_div_value=2.0, optimizer="adamw", lr=0.01)  # fmt: skip
    data = prepare_data(path, config)
    result = fit(config, data, tmp_path / "model.pt")
    history = [stats.train_perplexity for stats in result.history]
    (tmp_path / "full").mkdir()
    full = fit(config.model_copy(update={"adaptive_cutoffs": []}), data, tmp_path / "full" / "model.pt")
    assert history[-1] < history[0] and result.registered_val_perplexity < 1.1 * full.registered_val_perplexity
    model, vocab, saved = model_from_checkpoint(load_checkpoint(result.registered_checkpoint))
    assert model.adaptive is not None and saved["adaptive_cutoffs"] == [4, 10]
    assert [tail[0].out_features for tail in model.adaptive.tails] == [12, 6]  # 24 / 2, 24 / 4
    val = torch.as_tensor(np.asarray(data.load()[2], dtype=np.int64))
    again = evaluate(model, val, config.batch_size, config.num_steps)
    assert math.isclose(again, result.registered_val_perplexity, rel_tol=1e-5)
    [text] = generate(model, vocab, ["the"], 10, "word")
    assert text.startswith("the") and len(text.split()) == 11


def test_a_checkpoint_from_before_the_clusters_width_option_rebuilds_grave_et_als_widths():
    """adaptive_div_value narrows each tail cluster's projection by that factor; a checkpoint's config without it
    (written before the option) rebuilds the clusters it trained: a factor of 4."""
    options = dict(num_hiddens=64, rnn="lstm", num_layers=1, embedding_dim=64, adaptive_cutoffs=[10, 20])
    widths = lambda model: [tail[0].out_features for tail in model.adaptive.tails]  # noqa: E731
    assert widths(build_model(options, 40)) == [16, 4]
    assert widths(build_model({**options, "adaptive_div_value": 2.0}, 40)) == [32, 16]
    assert widths(build_model(TrainConfig(**options, adaptive_div_value=1.5), 40)) == [42, 28]
    with pytest.raises(ValueError, match="adaptive_div_value"):
        TrainConfig(adaptive_div_value=0.5)


def test_adaptive_cutoffs_are_checked_against_the_options_and_the_vocabulary(tmp_path, words):
    for cutoffs in ([0, 5], [50, 20], [20, 20]):
        with pytest.raises(ValueError, match="adaptive_cutoffs"):
            TrainConfig(adaptive_cutoffs=cutoffs)
    path, make = words
    config = make(adaptive_cutoffs=[20, 100_000])
    with pytest.raises(DataError, match="adaptive_cutoffs .* beyond the vocabulary"):
        prepare_data(path, config)


def test_a_tied_heads_words_come_with_the_lookup_and_give_autograds_gradients():
    """With the head tied to the embedding, the model's step gives the loss and every gradient bitwise of the plain
    path (the lookup and the head's slice of the weight, summed by autograd); the head's words taken with the lookup
    serve that forward's head only: not after the weights change, not without gradients, not in a copy."""
    torch.manual_seed(0)
    model = RNNLM(60, 16, "lstm", num_layers=2, embedding_dim=16, dropout=0.2, tie_weights=True, adaptive_cutoffs=[8])
    plain = RNNLM(60, 16, "lstm", num_layers=2, embedding_dim=16, dropout=0.2, tie_weights=True, adaptive_cutoffs=[8])
    plain.load_state_dict(model.state_dict())
    plain.adaptive.rows = lambda embedding, tokens: embedding(tokens)  # the lookup alone: the head slices the weight
    tokens, targets = torch.randint(0, 60, (3, 9)), torch.randint(0, 60, (3, 9))
    results = []
    for each in (model, plain):
        torch.manual_seed(1)
        loss, _ = each.loss(tokens, targets, each.begin_state(3))
        loss.backward()
        results.append((loss, [p.grad for p in each.parameters()]))
    assert torch.equal(results[0][0], results[1][0])
    assert all(torch.equal(a, b) for a, b in zip(results[0][1], results[1][1], strict=True))
    assert model.embedding.weight.grad[:8].abs().sum() > 0 and model.adaptive._pending is None  # taken by the head

    out, weight = model.adaptive, model.embedding.weight
    out.rows(model.embedding, tokens)
    taken = out._pending[0]
    assert out._head_weight() is taken and out._head_weight() is not taken  # once
    assert torch.equal(taken, torch.cat([weight[:8], out.clusters]))
    for changed in (weight, out.clusters):
        out.rows(model.embedding, tokens)
        with torch.no_grad():
            changed.add_(1.0)  # an optimizer's step: the head's weight built before is stale
        assert torch.equal(out._head_weight(), torch.cat([weight[:8], out.clusters]))
        assert not torch.equal(taken, out._head_weight())
        taken = out._head_weight()
    out.rows(model.embedding, tokens)
    assert copy.deepcopy(model).adaptive._pending is None and out._pending is not None
    with torch.no_grad():
        taken = out._pending[0]
        assert out._head_weight() is not taken  # without gradients: the weights' own rows
        out.rows(model.embedding, tokens)
    assert out._pending is None


def test_an_adaptive_model_pickled_before_the_tied_lookup_loads_and_trains():
    """A model pickled whole (as MLflow keeps a registered model) by a version without the tied lookup's state still
    runs and trains after loading: that state is a class default."""
    torch.manual_seed(0)
    model = RNNLM(30, 8, "lstm", embedding_dim=8, tie_weights=True, adaptive_cutoffs=[6])
    loaded = pickle.loads(pickle.dumps(model))
    loaded.adaptive.__dict__.pop("_pending", None)  # an older version's pickle has no such attribute
    tokens, targets = torch.randint(0, 30, (2, 9)), torch.randint(0, 30, (2, 9))
    for each in (model, loaded):
        torch.manual_seed(1)
        loss, _ = each.loss(tokens, targets, each.begin_state(2))
        loss.backward()
    assert torch.equal(loaded.embedding.weight.grad, model.embedding.weight.grad)
    with torch.no_grad():
        ours, theirs = loaded.eval()(tokens, loaded.begin_state(2))[0], model.eval()(tokens, model.begin_state(2))[0]
        torch.testing.assert_close(ours, theirs)


def test_amp_runs_the_engines_adaptive_softmax_in_bf16_and_leaves_float32_as_it_was(monkeypatch):
    """Under amp on a CPU with AVX512-BF16 the engine's adaptive softmax (its head and clusters, torch's matmuls) runs
    in bf16: loss and gradients within bf16 rounding of float32's, not equal to them; without amp, float32 exactly."""
    if not cpu.bf16_fast():
        pytest.skip("this CPU has no AVX512-BF16: amp leaves an adaptive softmax in float32")
    monkeypatch.setenv("RNNLM_CPU_CHOICE", "lstm-step=compiled")  # the engine's LSTM, not torch's (all bf16 then)
    torch.manual_seed(0)
    model = RNNLM(300, 64, "lstm", num_layers=2, embedding_dim=64, tie_weights=True, adaptive_cutoffs=[50, 150])
    tokens, targets = torch.randint(0, 300, (2, 8, 12)).unbind(0)
    assert cpu.handles(model, tokens)
    assert cpu.matmul_precision(model, True, (8, 12)).startswith("bf16 adaptive softmax")  # the run's line says so
    results = {}
    for amp in (False, True, False):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            loss, _ = model.loss(tokens, targets, model.begin_state(8))
        loss.backward()
        grads = [p.grad.clone() for p in model.parameters()]
        if amp or not results:
            results[amp] = (loss.detach(), grads)
        else:  # float32 again: bitwise what it was
            assert torch.equal(loss, results[False][0])
    (full, full_grads), (half, half_grads) = results[False], results[True]
    assert not torch.equal(full, half) and math.isclose(float(half), float(full), rel_tol=1e-2)
    for a, b in zip(half_grads, full_grads, strict=True):
        assert float((a - b).norm() / b.norm()) < 0.05
