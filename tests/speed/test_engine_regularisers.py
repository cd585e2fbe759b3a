"""AWD-LSTM's regularisers on the CPU engine against torch's layers with the same masks: weight drop, embedding
dropout (also over one-hot inputs), locked dropout and AR/TAR give the same loss, penalties, last state and every
gradient."""

import pytest
import torch

from rnnlm import cpu
from rnnlm.config import TrainConfig
from rnnlm.model import build_model

needs_build = pytest.mark.skipif(not cpu.compiled(), reason="no C compiler here: the compiled kernels are not built")

# each regulariser where the two paths draw the same masks in the same order (torch's stacked layer draws its own
# between-layer dropout inside its C++ call: a 2-layer model with plain dropout has it at 0 or locked)
SETTINGS = {
    "weight_drop": dict(num_layers=2, weight_drop=0.4),
    "embed_dropout": dict(num_layers=1, dropout=0.3, embed_dropout=0.25),
    "locked_dropout": dict(num_layers=2, dropout=0.3, locked_dropout=True),
    "one-hot, word and weight drop": dict(embedding_dim=0, embed_dropout=0.25, weight_drop=0.4, ar_alpha=1.0),
    "all, adaptive": dict(
        num_layers=2, dropout=0.3, locked_dropout=True, weight_drop=0.4, embed_dropout=0.25, ar_alpha=2.0,
        tar_beta=1.0, tie_weights=True, adaptive_cutoffs=[6, 12],
    ),
}  # fmt: skip


def _model(rnn: str, setting: str):
    torch.manual_seed(0)
    config = TrainConfig(rnn=rnn, num_hiddens=16, **{"embedding_dim": 16} | SETTINGS[setting])
    return build_model(config, 20), config


def _losses(model, config, tokens, targets, state, compiled: bool, monkeypatch, seed: int = 7):
    """(loss, penalty, last state, every gradient) of a training step's objective on one path, its masks drawn
    from `seed`."""
    monkeypatch.setattr(cpu, "ENABLED", compiled)
    assert cpu.handles(model, tokens) == compiled
    model.zero_grad()
    torch.manual_seed(seed)
    loss, penalty, last = model.penalised_loss(tokens, targets, state, config.ar_alpha, config.tar_beta)
    (loss + penalty).backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    return loss.detach(), torch.as_tensor(penalty).detach(), [s.detach() for s in last], grads


@needs_build
@pytest.mark.parametrize("setting", SETTINGS)
@pytest.mark.parametrize("rnn", ["rnn", "gru", "lstm"])
def test_the_engine_with_regularisers_equals_torch_layers_with_the_same_masks(rnn, setting, monkeypatch):
    model, config = _model(rnn, setting)
    assert model.regularisers and model.training
    tokens, targets = torch.randint(0, 20, (3, cpu.MIN_STEPS + 2)), torch.randint(0, 20, (3, cpu.MIN_STEPS + 2))
    state = model.begin_state(3)
    ours = _losses(model, config, tokens, targets, state, True, monkeypatch)
    theirs = _losses(model, config, tokens, targets, state, False, monkeypatch)
    torch.testing.assert_close(ours[0], theirs[0])
    torch.testing.assert_close(ours[1], theirs[1])
    for a, b in zip(ours[2], theirs[2], strict=True):
        torch.testing.assert_close(a, b)
    for name, grad in theirs[3].items():
        scale = grad.abs().max().clamp(min=1)
        torch.testing.assert_close(ours[3][name] / scale, grad / scale, msg=name)
    # the masks act: other masks give another loss, on the engine as on torch's layers
    other = _losses(model, config, tokens, targets, state, True, monkeypatch, seed=8)
    assert not torch.allclose(other[0], ours[0])


@needs_build
@pytest.mark.parametrize("rnn", ["gru", "lstm"])
def test_the_engines_loss_applies_weight_drop_as_torch_layers_do(rnn, monkeypatch):
    """`model.loss` (the engine's fused output layer) with weight drop: torch's loss under the same mask, and each
    minibatch another mask (two calls differ, the weights stay as they are)."""
    model, _ = _model(rnn, "weight_drop")
    tokens, state = torch.randint(0, 20, (3, cpu.MIN_STEPS)), model.begin_state(3)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    losses = []
    for compiled in (True, False):
        monkeypatch.setattr(cpu, "ENABLED", compiled)
        torch.manual_seed(3)
        losses.append(model.loss(tokens, tokens, state)[0].detach())
    torch.testing.assert_close(losses[0], losses[1])
    monkeypatch.setattr(cpu, "ENABLED", True)
    assert not torch.allclose(model.loss(tokens, tokens, state)[0], model.loss(tokens, tokens, state)[0])
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())
    model.eval()  # no mask in evaluation: the same loss twice
    assert torch.equal(model.loss(tokens, tokens, state)[0], model.loss(tokens, tokens, state)[0])


@needs_build
def test_the_compiled_whole_step_leaves_a_regularised_book_model_to_autograd():
    """The one-hot book model's compiled SGD step applies no regulariser: with weight drop it is not taken."""
    config = TrainConfig(rnn="rnn", num_hiddens=16, weight_drop=0.3, optimizer="sgd")
    model = build_model(config, 20)
    tokens, state = torch.randint(0, 20, (4, cpu.MIN_STEPS)), model.begin_state(4)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    assert cpu.handles(model, tokens)  # its layers on the engine, through autograd
    assert cpu.sgd_step(model, optimizer, tokens, tokens, state, 1.0, False) is None
    plain = build_model(config.model_copy(update={"weight_drop": 0.0}), 20)
    assert cpu.sgd_step(plain, torch.optim.SGD(plain.parameters(), lr=1.0), tokens, tokens, state, 1.0, False)
