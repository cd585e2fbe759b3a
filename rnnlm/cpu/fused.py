"""Whole training steps without autograd: the compiled windows, the output layer and the loss, clip and SGD.

`float32_step` (the one-layer tanh RNN, GRU and LSTM in float32) calls the windows of `rnnlm.cpu.recurrence`
forward and backward itself, the output layer with its loss and gradients in one C call per core, and torch's clip
and SGD in one C call. `sgd_step`, the bf16 LSTM's (`amp` on CPUs with AVX512-BF16), is one C call on each core
(kernels.c: rnnlm_lstm_sgd_bf16): each packs its half of the weights; runs the forward, the loss and its gradient and
the backward of its batch rows; computes W_hh's gradient for its hidden units and its share of the other gradients
with their squares; then clips and updates its share of the parameters, the workers waiting for each other three
times in between. The arithmetic of both is the autograd path's: the mean cross-entropy, torch's global-norm clip
(coefficient max_norm / (norm + 1e-6), at most 1) and plain SGD (tests/speed/test_fused.py).
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn

from rnnlm.cpu import native, threads
from rnnlm.cpu.recurrence import (
    OneHotGRU,
    OneHotLSTM,
    OneHotTanhRNN,
    bf16_backward_buffers,
    bf16_forward_buffers,
)


def plain_sgd(optimizer: torch.optim.Optimizer, params: list[torch.Tensor]) -> bool:
    """Whether `optimizer` is plain SGD (no momentum, weight decay, Nesterov or maximising) over exactly `params`,
    the six parameters of a one-layer model, in one group: the step the fused steps compute."""
    if type(optimizer) is not torch.optim.SGD or len(optimizer.param_groups) != 1 or len(params) != 6:
        return False
    group = optimizer.param_groups[0]
    plain = not any(group.get(key) for key in ("momentum", "weight_decay", "nesterov", "maximize"))
    return plain and len(group["params"]) == 6 and all(a is b for a, b in zip(group["params"], params, strict=True))


class _Saved:
    """What autograd's ctx is to a window's forward and backward, when the engine calls them itself."""

    def save_for_backward(self, *tensors: torch.Tensor) -> None:
        self.saved_tensors = tensors


@torch.no_grad()
def float32_step(model, tokens: torch.Tensor, targets: torch.Tensor, state, lr: float, max_norm: float):
    """One minibatch of the one-layer tanh RNN, GRU or LSTM in float32: forward window, output layer, mean
    cross-entropy, backward, gradients clipped to global norm `max_norm`, SGD step with learning rate `lr`.
    tokens, targets (batch, steps). Returns (the mean loss, a 0-d tensor; the last state), as the trainer's autograd
    step does; the parameters' .grad are left untouched."""
    rnn, out, share, saved = model.rnn, model.linear, threads.second_core_free(), _Saved()
    hs, last_state, backward = _forward(rnn, tokens.T.contiguous(), state, share, saved)
    grad_h = torch.empty_like(hs)
    grad_w, grad_b, loss = output_step(
        out, hs.view(-1, hs.shape[-1]), targets.T.contiguous(), grad_h.view(-1, hs.shape[-1]), share
    )
    grads = [*backward(grad_h), grad_w, grad_b]
    params = [rnn.weight_ih_l0, rnn.weight_hh_l0, rnn.bias_ih_l0, rnn.bias_hh_l0, out.weight, out.bias]
    native.clip_sgd([p.detach() for p in params], [g.contiguous() for g in grads], lr, max_norm)
    return (loss / targets.numel()).float(), last_state


def output_step(out: nn.Linear, hs: torch.Tensor, targets: torch.Tensor, grad_h: torch.Tensor, share: bool):
    """The output layer's forward, the summed cross-entropy of `targets` (rows of hs, time-major) and every gradient,
    in one C call per core (each half of the rows), without keeping the logits: fills grad_h (the gradient reaching
    hs, for a loss that is the mean over the rows) and returns (W_out's gradient, b_out's, the summed loss, 0-d)."""
    rows, vocab = hs.shape[0], out.out_features
    logits = torch.empty(rows, native.padded(vocab))
    loss, grad_b = torch.zeros(16, dtype=torch.float64), out.bias.new_zeros(2, vocab)
    grad_w = out.weight.new_zeros(2, *out.weight.shape)
    wout, wout_back = native.pack(out.weight, trans=True), native.pack(out.weight, trans=False)

    def half(span: tuple[int, int]) -> None:
        me = int(span[0] > 0)
        native.output_step(
            hs, wout, out.bias.detach(), wout_back, targets, logits, loss[8 * me :], grad_b[me], grad_w[me], grad_h,
            span,
        )  # fmt: skip

    threads.by_rows(rows, share, half)
    return grad_w.sum(0), grad_b.sum(0), loss.sum()


def _forward(rnn: nn.Module, tokens: torch.Tensor, state, share: bool, saved: _Saved):
    """A window forward: (outputs (steps, batch, H), the last state, backward(grad_h) -> the gradients of W_ih,
    W_hh, b_ih and b_hh)."""
    weights = (rnn.weight_ih_l0, rnn.weight_hh_l0, rnn.bias_ih_l0, rnn.bias_hh_l0)
    if isinstance(rnn, nn.LSTM):
        (h0, c0) = state
        hs, c_last = OneHotLSTM.forward(saved, tokens, h0[0].contiguous(), c0[0].contiguous(), *weights, share)
        grads = lambda grad_h: OneHotLSTM.backward(saved, grad_h, None)[3:7]  # noqa: E731
        return hs, (hs[-1:], c_last[None]), grads
    if isinstance(rnn, nn.GRU):
        hs = OneHotGRU.forward(saved, tokens, state[0].contiguous(), *weights, share)
        return hs, hs[-1:], lambda grad_h: OneHotGRU.backward(saved, grad_h)[2:6]
    bias = rnn.bias_ih_l0 + rnn.bias_hh_l0  # both biases folded in once
    hs = OneHotTanhRNN.forward(saved, tokens, state[0].contiguous(), rnn.weight_ih_l0, rnn.weight_hh_l0, bias, share)

    def grads(grad_h):
        _, _, grad_w_ih, grad_w_hh, grad_bias, _ = OneHotTanhRNN.backward(saved, grad_h)
        return grad_w_ih, grad_w_hh, grad_bias, grad_bias

    return hs, hs[-1:], grads


def lstm_candidates(vocab: int, hidden: int, batch: int, steps: int, torch_threads_default: int) -> dict:
    """Two ways to train an LSTM of this size for a minibatch, each as it would run: 'compiled' (`float32_step`, one
    torch thread and the helper thread) and 'torch' (torch's LSTM through autograd on `torch_threads_default`
    threads); for `rnnlm.cpu.choice` to time."""
    layers = SimpleNamespace(rnn=nn.LSTM(vocab, hidden), linear=nn.Linear(hidden, vocab))
    tokens, targets = torch.randint(0, vocab, (batch, steps)), torch.randint(0, vocab, (batch, steps))
    state = (torch.zeros(1, batch, hidden), torch.zeros(1, batch, hidden))

    def compiled() -> None:
        with threads.torch_threads(1):
            float32_step(layers, tokens, targets, state, 0.0, 1.0)

    def torch_layer() -> None:
        with threads.torch_threads(torch_threads_default):
            outputs, _ = layers.rnn(torch.nn.functional.one_hot(tokens.T, vocab).float(), state)
            logits = layers.linear(outputs.reshape(-1, hidden))
            torch.nn.functional.cross_entropy(logits, targets.T.reshape(-1)).backward()
            torch.nn.utils.clip_grad_norm_(list(layers.rnn.parameters()), 1.0, foreach=True)

    return {"compiled": compiled, "torch": torch_layer}


def sgd_step(model, tokens: torch.Tensor, targets: torch.Tensor, state, lr: float, max_norm: float):
    """One minibatch: forward, mean cross-entropy, backward, gradients clipped to global norm `max_norm`, SGD step
    with learning rate `lr`, all on the CPU. tokens, targets (batch, steps). Returns (the mean loss, a 0-d tensor;
    the last step's state), as the trainer's autograd step does; the parameters' .grad are left untouched."""
    arrays = _arrays(model, tokens, targets, state)
    step = native.LSTMSGDStep.of(arrays, lr, max_norm)
    workers = 2 if threads.second_core_free() and step.batch >= 2 and step.H >= 2 else 1
    threads.on_workers(workers, step.worker)
    mean_loss = (arrays["loss"][0::8].sum() / targets.numel()).float()
    return mean_loss, (arrays["hs"][-1][None], arrays["cs"][-1][None])


def _arrays(model, tokens: torch.Tensor, targets: torch.Tensor, state) -> dict[str, torch.Tensor]:
    """The tensors behind `native.LSTMSGDStep`'s pointers: inputs, parameters (updated in place), buffers."""
    rnn, linear, (h0, c0) = model.rnn, model.linear, state
    (batch, steps), hidden, vocab = tokens.shape, rnn.hidden_size, linear.out_features
    params = [rnn.weight_ih_l0, rnn.weight_hh_l0, rnn.bias_ih_l0, rnn.bias_hh_l0, linear.weight, linear.bias]
    return {
        "tokens": tokens.T.contiguous(),
        "targets": targets.T.contiguous(),  # time-major, as the logits' rows
        "h0": h0[0].contiguous(),
        "c0": c0[0].contiguous(),
        "zeros": torch.zeros(batch, hidden),
        **dict(zip(("w_ih", "w_hh", "b_ih", "b_hh", "w_out", "b_out"), (p.detach() for p in params), strict=True)),
        "emb": torch.empty(vocab, 4 * hidden),
        "whh_fwd": native.packed_bf16(hidden, 4 * hidden),
        "whh_back": native.packed_bf16(4 * hidden, hidden),
        "wout_fwd": native.packed(hidden, vocab),
        "wout_back": native.packed(vocab, hidden),
        **bf16_forward_buffers(steps, batch, hidden, vocab),
        **bf16_backward_buffers(steps, batch, hidden, vocab),
        "loss": torch.zeros(16, dtype=torch.float64),
        "grad_b": torch.empty(4 * hidden),
        "grad_w_out": torch.zeros(2, vocab, hidden),
        "grad_b_out": torch.zeros(2, vocab),
    }
