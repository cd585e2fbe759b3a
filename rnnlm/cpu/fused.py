"""A whole training step of the bf16 LSTM (`amp` on CPUs with AVX512-BF16) in compiled code, without autograd.

The step is one C call on each core (kernels.c: rnnlm_lstm_sgd_bf16): each packs its half of the weights; runs the
forward, the loss and its gradient and the backward of its batch rows; computes W_hh's gradient for its hidden units
and its share of the other gradients with their squares; then clips and updates its share of the parameters. The
workers wait for each other three times in between. The arithmetic is the autograd path's: the mean cross-entropy,
torch's global-norm clip (coefficient max_norm / (norm + 1e-6), at most 1) and plain SGD (tests/speed/test_fused.py).
"""

from __future__ import annotations

import torch

from rnnlm.cpu import native, threads
from rnnlm.cpu.recurrence import bf16_backward_buffers, bf16_forward_buffers


def plain_sgd(optimizer: torch.optim.Optimizer, params: list[torch.Tensor]) -> bool:
    """Whether `optimizer` is plain SGD (no momentum, weight decay, Nesterov or maximising) over exactly `params`,
    the six parameters of a one-layer LSTM model, in one group: the step `sgd_step` computes."""
    if type(optimizer) is not torch.optim.SGD or len(optimizer.param_groups) != 1 or len(params) != 6:
        return False
    group = optimizer.param_groups[0]
    plain = not any(group.get(key) for key in ("momentum", "weight_decay", "nesterov", "maximize"))
    return plain and len(group["params"]) == 6 and all(a is b for a, b in zip(group["params"], params, strict=True))


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
