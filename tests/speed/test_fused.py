"""The bf16 LSTM's fused training step (`rnnlm.cpu.fused`) against the same step through autograd, torch's loss, clip
and SGD."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rnnlm import cpu
from rnnlm.config import TrainConfig
from rnnlm.cpu import fused, recurrence, threads
from rnnlm.model import RNNLM
from rnnlm.train import make_optimizer, train

pytestmark = pytest.mark.skipif(not cpu.compiled(), reason="no C compiler here: the compiled kernels are not built")


def _autograd_step(model, tokens, targets, state, lr, max_norm, share):
    """The reference: the bf16 windows through autograd (`OneHotLSTMLogits`), torch's cross-entropy, clip and SGD."""
    rnn, linear = model.rnn, model.linear
    params = (rnn.weight_ih_l0, rnn.weight_hh_l0, rnn.bias_ih_l0, rnn.bias_hh_l0, linear.weight, linear.bias)
    model.zero_grad(set_to_none=True)
    logits, h, c = recurrence.OneHotLSTMLogits.apply(tokens.T, state[0][0], state[1][0], *params, share)
    loss = F.cross_entropy(logits, targets.T.reshape(-1))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm, foreach=True)
    torch.optim.SGD(model.parameters(), lr=lr).step()
    return loss.detach(), (h.detach()[None], c.detach()[None])


@pytest.mark.parametrize("max_norm", [0.05, 1e6], ids=["clipped", "unclipped"])
@pytest.mark.parametrize("share", [True, False], ids=["two-threads", "one-thread"])
def test_compiled_fused_steps_match_autograd_steps(monkeypatch, share, max_norm):
    """Three steps from the same weights and state: the same losses, states and weights after each step (to 2e-4
    of each weight's largest update). Odd batch, hidden and vocabulary sizes run the kernels' edge code; a small
    max_norm makes clipping act on every step, a large one never."""
    monkeypatch.setattr(threads, "second_core_free", lambda: share)
    torch.manual_seed(4)
    vocab, hidden, batch, steps = 9, 41, 13, 11
    ours, theirs = RNNLM(vocab, hidden, "lstm"), RNNLM(vocab, hidden, "lstm")
    theirs.load_state_dict(ours.state_dict())
    state_ours = state_theirs = tuple(torch.randn(1, batch, hidden) for _ in range(2))
    for _ in range(3):
        tokens, targets = torch.randint(0, vocab, (batch, steps)), torch.randint(0, vocab, (batch, steps))
        before = {n: p.detach().clone() for n, p in ours.named_parameters()}
        loss_ours, state_ours = fused.sgd_step(ours, tokens, targets, state_ours, 0.7, max_norm)
        loss_theirs, state_theirs = _autograd_step(theirs, tokens, targets, state_theirs, 0.7, max_norm, share)
        torch.testing.assert_close(loss_ours, loss_theirs, rtol=1e-5, atol=1e-6)
        for a, b in zip(state_ours, state_theirs, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
        for (name, a), b in zip(ours.named_parameters(), theirs.parameters(), strict=True):
            update = (b.detach() - before[name]).abs().max()
            error = float((a.detach() - b.detach()).abs().max() / update)
            assert error < 2e-4, (name, error)


def test_fused_steps_only_for_plain_sgd_on_the_engine(monkeypatch):
    """A fused step stands in for torch's SGD only when nothing else would change the update, and only for models the
    engine serves; the bf16 step only under `amp` where bf16 runs at its speed."""
    model = RNNLM(9, 16, "lstm")
    tokens = torch.zeros(4, 10, dtype=torch.int64)
    state = model.begin_state(4)
    plain = make_optimizer(model, 1.0)
    assert fused.plain_sgd(plain, list(model.parameters()))
    for other in (
        torch.optim.SGD(model.parameters(), lr=1.0, momentum=0.9),
        torch.optim.SGD(model.parameters(), lr=1.0, weight_decay=1e-4),
        torch.optim.Adam(model.parameters()),
        torch.optim.SGD(list(model.parameters())[:4], lr=1.0),
    ):
        assert not fused.plain_sgd(other, list(model.parameters()))
        assert cpu.sgd_step(model, other, tokens, tokens, state, 1.0, amp=True) is None
    assert cpu.sgd_step(model, plain, tokens[:, :2], tokens[:, :2], state, 1.0, amp=False) is None  # short windows
    deep = RNNLM(9, 16, "gru", num_layers=2)
    assert cpu.sgd_step(deep, make_optimizer(deep, 1.0), tokens, tokens, deep.begin_state(4), 1.0, amp=False) is None
    calls = []
    for name in ("sgd_step", "float32_step"):
        step = getattr(fused, name)
        monkeypatch.setattr(fused, name, lambda *args, _name=name, _step=step: calls.append(_name) or _step(*args))
    assert cpu.sgd_step(model, plain, tokens, tokens, state, 1.0, amp=False) is not None
    assert cpu.sgd_step(model, plain, tokens, tokens, state, 1.0, amp=True) is not None
    assert calls == ["float32_step", "sgd_step" if cpu.bf16_fast() else "float32_step"]


def test_the_one_layer_lstm_and_rnn_take_the_whole_step_in_c(monkeypatch):
    """With a small output layer the LSTM's and the RNN's float32 step is one C call per core; the GRU's, and a large
    output layer's, the windows called from Python (both give autograd's step: the test below)."""
    calls = []
    whole = fused._whole_float32_step
    monkeypatch.setattr(
        fused, "_whole_float32_step", lambda *args: calls.append(type(args[0].rnn).__name__) or whole(*args)
    )
    tokens = torch.zeros(4, 10, dtype=torch.int64)
    for rnn, vocab in (("rnn", 9), ("gru", 9), ("lstm", 9), ("lstm", 300)):
        model = RNNLM(vocab, 256 if vocab == 300 else 16, rnn)
        assert cpu.sgd_step(model, make_optimizer(model, 1.0), tokens, tokens, model.begin_state(4), 1.0, amp=False)
    assert calls == ["RNN", "LSTM"]  # 300 x 256 weights in the output layer: over fused.SMALL_OUTPUT


def _autograd_float32_step(model, tokens, targets, state, lr, max_norm):
    """The reference: the model's forward through autograd, torch's cross-entropy, clip and SGD."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    logits, state = model(tokens, state)
    loss = F.cross_entropy(logits, targets.T.reshape(-1))
    optimizer.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm, foreach=True)
    optimizer.step()
    detach = lambda s: s.detach()  # noqa: E731
    return loss.detach(), tuple(map(detach, state)) if isinstance(state, tuple) else detach(state)


@pytest.mark.parametrize("rnn", ["rnn", "gru", "lstm"])
@pytest.mark.parametrize("max_norm", [0.05, 1e6], ids=["clipped", "unclipped"])
@pytest.mark.parametrize("share", [True, False], ids=["two-threads", "one-thread"])
def test_compiled_float32_steps_match_autograd_steps(monkeypatch, rnn, share, max_norm):
    """The float32 fused step of each model, three steps from the same weights and state: the same losses, states
    and weights after each step (to 2e-4 of each weight's largest update). Odd sizes run the kernels' edge code."""
    monkeypatch.setattr(threads, "second_core_free", lambda: share)
    _float32_steps_match(rnn, max_norm, vocab=9, hidden=41)


@pytest.mark.parametrize("rnn", ["rnn", "lstm"])
@pytest.mark.parametrize("logits", ["compiled", "torch"])
def test_compiled_float32_steps_with_a_large_output_layer_match_autograd_steps(rnn, logits, monkeypatch):
    """Over fused.SMALL_OUTPUT the LSTM's and the RNN's step calls the windows from Python instead, the output
    layer on torch's matmuls, its logits on the kernels' or torch's: the same as autograd's too."""
    monkeypatch.setenv("RNNLM_CPU_CHOICE", f"lstm-step=compiled, linear-large={logits}")
    _float32_steps_match(rnn, 0.05, vocab=301, hidden=230)


def _float32_steps_match(rnn: str, max_norm: float, vocab: int, hidden: int) -> None:
    torch.manual_seed(4)
    batch, steps = 13, 11
    ours, theirs = RNNLM(vocab, hidden, rnn), RNNLM(vocab, hidden, rnn)
    theirs.load_state_dict(ours.state_dict())
    begin = ours.begin_state(batch)
    state_ours = state_theirs = tuple(map(torch.randn_like, begin)) if rnn == "lstm" else torch.randn_like(begin)
    for _ in range(3):
        tokens, targets = torch.randint(0, vocab, (batch, steps)), torch.randint(0, vocab, (batch, steps))
        before = {n: p.detach().clone() for n, p in theirs.named_parameters()}
        loss_ours, state_ours = fused.float32_step(ours, tokens, targets, state_ours, 0.7, max_norm)
        loss_theirs, state_theirs = _autograd_float32_step(theirs, tokens, targets, state_theirs, 0.7, max_norm)
        torch.testing.assert_close(loss_ours, loss_theirs, rtol=1e-5, atol=1e-6)
        pairs = zip(state_ours, state_theirs, strict=True) if rnn == "lstm" else [(state_ours, state_theirs)]
        for a, b in pairs:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
        for (name, a), b in zip(ours.named_parameters(), theirs.parameters(), strict=True):
            update = (b.detach() - before[name]).abs().max()
            assert float((a.detach() - b.detach()).abs().max() / update) < 2e-4, name


def test_amp_training_of_the_lstm_takes_the_fused_step(monkeypatch):
    """An epoch with `amp` on a CPU with AVX512-BF16 runs every minibatch through `fused.sgd_step`, and it learns."""
    if not cpu.bf16_fast():
        pytest.skip("this CPU has no AVX512-BF16: amp keeps the LSTM's float32 kernels and autograd")
    calls = []
    step = fused.sgd_step
    monkeypatch.setattr(fused, "sgd_step", lambda *args: calls.append(1) or step(*args))
    torch.manual_seed(0)
    corpus = np.array([i % 7 for i in range(2_000)])
    model = RNNLM(7, 32, "lstm")
    config = TrainConfig(batch_size=8, num_steps=10, lr=1.0, grad_clip=1.0, num_epochs=11, amp=True)
    optimizer, generator = make_optimizer(model, config.lr), torch.Generator().manual_seed(0)
    history = train(model, corpus, corpus[:0], config, optimizer, generator).history
    first, last = history[0].train_perplexity, history[-1].train_perplexity
    assert len(calls) == 11 * (1_999 // 80)
    assert last < first / 2
