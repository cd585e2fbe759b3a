"""The hand-written CPU tanh RNN against torch's `nn.RNN`: same outputs, states and gradients."""

import torch

from rnnlm.model import RNNLM


def _run(model, tokens, state, fused: bool):
    model.zero_grad()
    state = tuple(s.clone().requires_grad_() for s in state)
    model._use_recurrence = (lambda t: True) if fused else (lambda t: False)
    logits, new_state = model(tokens, state if len(state) == 2 else state[0])
    parts = new_state if isinstance(new_state, tuple) else (new_state,)
    loss = (logits * torch.linspace(-1, 1, logits.shape[-1])).square().sum() + sum(p.sum() * 3 for p in parts)
    loss.backward()
    del model._use_recurrence
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    grads |= {f"state{i}": s.grad for i, s in enumerate(state)}  # the gradient reaching the initial state
    return logits.detach(), [p.detach() for p in parts], grads


def test_recurrence_equals_torch_layers():
    torch.manual_seed(0)
    model = RNNLM(11, 16, "rnn")
    tokens = torch.randint(0, 11, (3, 7))
    state = model.begin_state(3)
    state = tuple(torch.randn_like(s) for s in (state if isinstance(state, tuple) else (state,)))
    ours, theirs = _run(model, tokens, state, True), _run(model, tokens, state, False)
    torch.testing.assert_close(ours[0], theirs[0])
    for a, b in zip(ours[1], theirs[1], strict=True):
        torch.testing.assert_close(a, b)
    assert ours[2].keys() == theirs[2].keys()
    for name in ours[2]:
        torch.testing.assert_close(ours[2][name], theirs[2][name], msg=name)


def test_recurrence_serves_the_one_layer_tanh_rnn_in_float32_only():
    tokens = torch.zeros(2, 3, dtype=torch.int64)
    assert RNNLM(5, 4, "rnn")._use_recurrence(tokens)
    assert not RNNLM(5, 4, "rnn", num_layers=2)._use_recurrence(tokens)
    assert not RNNLM(5, 4, "gru")._use_recurrence(tokens) and not RNNLM(5, 4, "lstm")._use_recurrence(tokens)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not RNNLM(5, 4, "rnn")._use_recurrence(tokens)  # low precision goes to torch's layer
