"""AWD-LSTM's regularisers (weight drop, embedding and locked dropout, AR/TAR, variable windows, NT-ASGD): each acts as
it says, off they leave today's training exactly, and a run with all of them resumes exactly."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import CUDA, resume_settings, small_text
from torch import nn

from rnnlm import cpu
from rnnlm.batches import as_tensor, num_batches, sequential_batches, variable_batches
from rnnlm.checkpoint import best_checkpoint, load_checkpoint
from rnnlm.config import TrainConfig
from rnnlm.data import prepare_data
from rnnlm.evaluate import evaluate
from rnnlm.model import RNNLM, build_model
from rnnlm.run import fit
from rnnlm.state import Hooks
from rnnlm.tokens import build_vocab, encode, prepare_text
from rnnlm.train import _step, make_optimizer, train

ALL_ON = dict(
    rnn="lstm", num_layers=2, embedding_dim=16, dropout=0.3, weight_drop=0.3, embed_dropout=0.1, locked_dropout=True,
    ar_alpha=2.0, tar_beta=1.0, variable_steps=True, optimizer="ntasgd", asgd_patience=1,
)  # fmt: skip


@pytest.fixture(scope="module")
def tiny():
    text = prepare_text(small_text(3000), "book", "char")
    vocab = build_vocab(text, "char")
    return vocab, encode(text, vocab, "char")


@pytest.fixture
def torch_layers(monkeypatch):
    """The CPU engine off, so that a reference written with torch's layers computes the same floats."""
    monkeypatch.setattr(cpu, "ENABLED", False)


def _old_loss(model: RNNLM, tokens, targets, state):
    """The model's training loss as it was computed before the regularisers existed (its modules, called directly)."""
    inputs = model.drop(model.embedding(tokens.T)) if model.embedding is not None else None
    if inputs is None:
        inputs = F.one_hot(tokens.T, model.vocab_size).float()
    outputs, state = model.rnn(inputs, state)
    logits = model.linear(model.drop(outputs).reshape(-1, model.num_hiddens))
    return F.cross_entropy(logits, targets.T.reshape(-1)), state


# --- off: today's numbers ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("rnn", ["rnn", "gru", "lstm"])
@pytest.mark.parametrize("embedding_dim", [0, 12])
def test_off_the_loss_and_gradients_are_todays(torch_layers, rnn, embedding_dim):
    torch.manual_seed(0)
    config = TrainConfig(rnn=rnn, num_hiddens=12, num_layers=2, embedding_dim=embedding_dim, dropout=0.4)
    model = build_model(config, 20)
    tokens, state = torch.randint(0, 20, (4, 9)), model.begin_state(4)
    assert model.regularisers == ()
    torch.manual_seed(1)
    loss, _ = model.loss(tokens, tokens, state)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    torch.manual_seed(1)
    expected, _ = _old_loss(model, tokens, tokens, state)
    assert torch.equal(loss, expected)  # the same dropout masks, drawn in the same order, the same floats
    expected_grads = torch.autograd.grad(expected, list(model.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(grads, expected_grads, strict=True))


def test_off_training_is_the_plain_loop(torch_layers, tiny):
    """A training with every regulariser at its default takes exactly the steps of the loop before them: sequential
    windows, the cross-entropy alone, clipping, plain SGD."""
    vocab, ids = tiny
    config = TrainConfig(rnn="gru", num_hiddens=16, embedding_dim=8, dropout=0.2, batch_size=4, num_steps=8, lr=1.0,
                         num_epochs=2, cpu_threads=1)  # fmt: skip
    torch.manual_seed(0)
    model = build_model(config, len(vocab))
    reference = copy.deepcopy(model)
    torch.manual_seed(5)
    train(model, ids, ids[:1], config, make_optimizer(model, config.lr, config), torch.Generator().manual_seed(3))

    torch.manual_seed(5)
    optimizer, generator = torch.optim.SGD(reference.parameters(), lr=1.0), torch.Generator().manual_seed(3)
    for _ in range(config.num_epochs):
        state = reference.begin_state(4)
        for inputs, targets in sequential_batches(as_tensor(ids), 4, 8, generator):
            state = state.detach()
            loss, state = _old_loss(reference, inputs, targets, state)
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(reference.parameters(), 1.0)
            optimizer.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), reference.parameters(), strict=True))


def test_off_the_engine_still_serves(tiny):
    if not cpu.compiled():
        pytest.skip("the compiled kernels do not serve here (no C compiler, or RNNLM_NATIVE=0)")
    model = build_model(TrainConfig(rnn="gru"), 28)
    assert cpu.why_not(model, torch.zeros(4, 10, dtype=torch.int64)) is None


# --- each regulariser ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rnn", ["rnn", "gru", "lstm"])
@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_weight_drop_one_mask_per_minibatch_none_in_evaluation(rnn, device):
    torch.manual_seed(0)
    model = RNNLM(10, 16, rnn, weight_drop=0.5).to(device).train()
    raw = model.rnn.weight_hh_l0.detach().clone()
    tokens, state = torch.randint(0, 10, (3, 12), device=device), model.begin_state(3, device)
    torch.manual_seed(7)
    dropped = model.recurrent_weights()[0]
    torch.manual_seed(7)
    outputs, _ = model.recurrent(tokens, state)  # on a GPU: cuDNN's layer, given the dropped weights
    # the window computed step by step with one dropped W_hh for all its steps gives the layer's outputs
    tolerance = 1e-6 if device == "cpu" else 1e-3  # cuDNN may round its matmuls' inputs to TF32
    assert torch.allclose(outputs, _by_cells(rnn, model, tokens, state, dropped), atol=tolerance)
    kept = dropped[1] != 0
    assert torch.equal(dropped[1][kept], 2 * raw[kept]) and 0.3 < kept.float().mean() < 0.7  # scaled by 1/(1-p)
    assert not torch.equal(model.recurrent_weights()[0][1], dropped[1])  # the next minibatch: another mask
    outputs.sum().backward()
    assert torch.equal(model.rnn.weight_hh_l0.detach(), raw)  # the stored weights are as they were
    assert (model.rnn.weight_hh_l0.grad[~kept] == 0).all() and (model.rnn.weight_hh_l0.grad[kept] != 0).any()
    model.eval()
    assert torch.equal(model.recurrent(tokens, state)[0], model.rnn(F.one_hot(tokens.T, 10).float(), state)[0])


def _by_cells(rnn: str, model: RNNLM, tokens, state, weights):
    """One layer over the window, a cell call a step, with the same `weights` at every step."""
    cell = {"rnn": torch.rnn_tanh_cell, "gru": torch.gru_cell, "lstm": torch.lstm_cell}[rnn]
    state = (state[0][0], state[1][0]) if rnn == "lstm" else state[0]
    outputs = []
    for x in F.one_hot(tokens.T, model.vocab_size).float():
        state = cell(x, state, *weights)
        outputs.append(state[0] if rnn == "lstm" else state)
    return torch.stack(outputs)


def test_embedding_dropout_drops_whole_words():
    torch.manual_seed(0)
    model = RNNLM(12, 8, "gru", embedding_dim=6, embed_dropout=0.5).train()
    tokens = torch.arange(12).repeat(5, 3)  # every word, 15 times over
    inputs, rows = model.first_inputs(tokens), model.embedding(tokens)
    dropped = (inputs == 0).all(-1)
    for word in range(12):
        where = tokens == word
        assert dropped[where].all() or (not dropped[where].any() and torch.allclose(inputs[where], 2 * rows[where]))
    assert 0 < dropped[0, :12].sum() < 12  # some words dropped, some kept
    assert torch.equal(model.eval().first_inputs(tokens), model.embedding(tokens))


def test_locked_dropout_one_mask_per_sequence_for_all_steps():
    torch.manual_seed(0)
    model = RNNLM(10, 16, "rnn", num_layers=2, dropout=0.5, locked_dropout=True).train()
    ones = torch.ones(30, 4, 16)
    masks = model.dropped(ones)
    assert (masks == masks[0]).all() and {0.0, 2.0} == set(masks.unique().tolist())
    assert not (model.drop(ones) == model.drop(ones)[0]).all()  # without it: a mask per element
    # the model's layers: one mask between the layers and one before the output, each for every step
    tokens, state = torch.randint(0, 10, (4, 9)), model.begin_state(4)
    torch.manual_seed(3)
    outputs = model.hidden_torch(tokens, state)[0].reshape(9, 4, 16)
    torch.manual_seed(3)
    between, before_output = (torch.empty(1, 4, 16).bernoulli_(0.5) * 2 for _ in range(2))
    layers = [nn.RNN(10, 16), nn.RNN(16, 16)]
    for layer, single in enumerate(layers):
        names = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
        single.load_state_dict({f"{name}_l0": getattr(model.rnn, f"{name}_l{layer}") for name in names})
    first, _ = layers[0](F.one_hot(tokens.T, 10).float(), state[:1])
    second, _ = layers[1](first * between, state[1:])
    assert torch.allclose(outputs, second * before_output, atol=1e-6)


def test_ar_tar_change_the_gradient_not_the_reported_loss(tiny):
    vocab, ids = tiny
    tokens, targets = (as_tensor(ids[start : start + 80]).long().view(4, 20) for start in (0, 1))
    results = {}
    for penalties in ({}, {"ar_alpha": 2.0, "tar_beta": 1.0}):
        config = TrainConfig(rnn="lstm", num_hiddens=16, embedding_dim=8, dropout=0.3, **penalties)
        torch.manual_seed(0)
        model = build_model(config, len(vocab))
        torch.manual_seed(1)
        loss, _ = _step(model, tokens, targets, model.begin_state(4), make_optimizer(model, 1.0, config), config)
        results[bool(penalties)] = loss, [p.detach().clone() for p in model.parameters()]
    assert torch.equal(results[False][0], results[True][0])  # the same masks, the cross-entropy alone reported
    assert not all(torch.equal(a, b) for a, b in zip(results[False][1], results[True][1], strict=True))


def test_ar_tar_penalties_are_the_mean_squares():
    torch.manual_seed(0)
    model = RNNLM(10, 8, "gru").train()
    tokens, state = torch.randint(0, 10, (3, 7)), model.begin_state(3)
    outputs, _ = model.recurrent(tokens, state)
    loss, penalty, _ = model.penalised_loss(tokens, tokens, state, 0.5, 3.0)
    expected = 0.5 * outputs.pow(2).mean() + 3.0 * (outputs[1:] - outputs[:-1]).pow(2).mean()
    assert torch.allclose(penalty, expected) and torch.equal(loss, model.loss(tokens, tokens, state)[0])


def test_variable_windows_vary_cover_the_rows_and_repeat_from_the_seed():
    corpus = torch.arange(4000)
    windows = list(variable_batches(corpus, 4, 20, torch.Generator().manual_seed(0)))
    lengths = [x.shape[1] for x, _ in windows]
    assert len(set(lengths)) > 5 and all(5 <= n <= 40 for n in lengths[:-1])
    rows = torch.cat([x for x, _ in windows], dim=1)
    assert torch.equal(rows[:, 1:], rows[:, :-1] + 1)  # contiguous along each row: nothing skipped or repeated
    again = [x.shape[1] for x, _ in variable_batches(corpus, 4, 20, torch.Generator().manual_seed(0))]
    assert again == lengths


def test_an_epoch_of_variable_windows_counts_the_windows_it_has_for_the_schedule():
    """The cosine schedule plans its steps from the epoch's window count: with variable windows, the mean number an
    epoch has (more than fixed windows give, as some windows are around half num_steps)."""
    corpus, counts = torch.arange(200_000), []
    for seed in range(20):
        counts.append(len(list(variable_batches(corpus, 8, 35, torch.Generator().manual_seed(seed)))))
    planned = num_batches(len(corpus), 8, 35, False, variable_steps=True)
    assert abs(planned - sum(counts) / len(counts)) < 0.01 * planned
    assert planned > 1.02 * num_batches(len(corpus), 8, 35, False)


class RecordingSGD(torch.optim.SGD):
    """SGD that notes the rate of each step."""

    def __init__(self, params, lr):
        super().__init__(params, lr=lr)
        self.rates = []

    def step(self, closure=None):
        self.rates.append(self.param_groups[0]["lr"])
        return super().step(closure)


def test_variable_windows_scale_the_rate_by_their_length(tiny):
    vocab, ids = tiny
    config = TrainConfig(num_hiddens=8, batch_size=4, num_steps=10, lr=0.5, num_epochs=1, variable_steps=True)
    model = build_model(config, len(vocab))
    optimizer = RecordingSGD(model.parameters(), 0.5)
    generator = torch.Generator().manual_seed(2)
    windows = [x.shape[1] for x, _ in variable_batches(as_tensor(ids), 4, 10, torch.Generator().manual_seed(2))]
    train(model, ids, ids[:1], config, optimizer, generator)
    assert optimizer.rates == [0.5 * n / 10 for n in windows] and len(set(windows)) > 3


def test_ntasgd_evaluates_and_keeps_the_averaged_weights(tmp_path, small_corpus):
    config = TrainConfig(**resume_settings(tmp_path, small_corpus, optimizer="ntasgd", asgd_patience=1, lr=4.0,
                                           num_epochs=8, eval_every=1, checkpoint_every=1))  # fmt: skip
    data = prepare_data(small_corpus, config)
    averaged = []

    def on_epoch(stats, state):  # the model holds SGD's weights here; the evaluation saw the average
        if state.average is not None and state.averaged_steps:
            check = build_model(config, len(vocab))
            check.load_state_dict(state.average)
            val = evaluate(check, as_tensor(val_ids), config.batch_size, config.num_steps, config.cpu_threads)
            weights = {k: v.clone() for k, v in state.average.items()}
            averaged.append((stats.val_perplexity, val, state.best_step, weights))

    vocab, _, val_ids = data.load()
    result = fit(config, data, tmp_path / "m.pt", Hooks(on_epoch=on_epoch))
    assert averaged, "averaging never started: the test's training must stall for a validation"
    assert all(seen == val for seen, val, _, _ in averaged)
    ckpt, best = load_checkpoint(tmp_path / "m.pt"), load_checkpoint(best_checkpoint(tmp_path / "m.pt"))
    assert ckpt["average"] is None  # saved once: the checkpoint's model is the average
    last_average = averaged[-1][3]
    assert all(torch.equal(ckpt["model"][k], last_average[k]) for k in last_average)  # the last epoch's average
    assert not all(torch.equal(ckpt["model"][k], ckpt["training_weights"][k]) for k in last_average)
    last = build_model(config, len(vocab))
    last.load_state_dict(ckpt["model"])
    assert result.val_perplexity == pytest.approx(evaluate(last, as_tensor(val_ids), 8, 10) , rel=1e-6)
    if best["step"] > averaged[0][2]:  # the best weights were taken after averaging started: they are an average
        taken = next(weights for _, _, step, weights in averaged if step == best["step"])
        assert all(torch.equal(best["model"][k], taken[k]) for k in taken)


# --- the engine and resuming -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("field, value", [
    ("weight_drop", 0.2), ("embed_dropout", 0.1), ("locked_dropout", True), ("ar_alpha", 1.0), ("tar_beta", 1.0),
    ("variable_steps", True), ("optimizer", "ntasgd"),
])  # fmt: skip
def test_the_engine_trains_with_each_regulariser(field, value):
    """The engine applies every regulariser through the model's own functions (tests/speed/test_engine_regularisers.py
    compares the numbers), over the book's one-hot inputs as over an embedding."""
    if not cpu.compiled():
        pytest.skip("no C compiler here: the compiled kernels are not built")
    window = torch.zeros(4, 10, dtype=torch.int64)
    for embedding_dim in (0, 8):
        model = build_model(TrainConfig(rnn="gru", dropout=0.2, embedding_dim=embedding_dim, **{field: value}), 28)
        assert model.regularisers and cpu.why_not(model, window) is None
        assert cpu.engine_name(model, (4, 10)).startswith("compiled kernels")


class Crash(Exception):
    """Ends a training abruptly, as a crash would (without a checkpoint of its own)."""


def test_resume_mid_epoch_with_every_regulariser_on_ends_identical(tmp_path, small_corpus):
    short = dict(num_hiddens=16, max_tokens=4000, val_max_tokens=400, num_epochs=2, eval_every_steps=5)
    config = TrainConfig(**resume_settings(tmp_path, small_corpus, **ALL_ON, **short, checkpoint_every_steps=4,
                                           progress_every=1))  # fmt: skip
    data = prepare_data(small_corpus, config)
    reference = fit(config, data, tmp_path / "reference.pt")

    def crash(state, values):  # a few steps after the last checkpoint, once NT-ASGD averages
        if state.averaged_steps >= 5 and state.step % 4 == 3:
            raise Crash

    with pytest.raises(Crash):
        fit(config, data, tmp_path / "crashed.pt", Hooks(on_progress=crash))
    saved = load_checkpoint(tmp_path / "crashed.pt")
    assert saved["batch"] > 0 and saved["averaged_steps"] > 0  # inside an epoch, NT-ASGD averaging
    resumed = fit(config, data, tmp_path / "crashed.pt")
    for key in ("train_perplexity", "val_perplexity", "best_val_perplexity", "steps", "registered_val_perplexity"):
        assert getattr(resumed, key) == getattr(reference, key)
    ours, theirs = load_checkpoint(tmp_path / "crashed.pt"), load_checkpoint(tmp_path / "reference.pt")
    for part in ("model", "training_weights"):
        assert all(torch.equal(ours[part][k], theirs[part][k]) for k in theirs[part])
