"""A whole training step of the bf16 LSTM (`amp` on CPUs with AVX512-BF16) without autograd.

Through autograd, a minibatch of the book's LSTM spends about 1.8 ms around its 2.9 ms of compiled windows: the loss
and its gradient as torch ops (0.25 ms), the output layer's weight gradient, the clipping norm, the SGD step, whose
two largest gradients (W_hh's and W_ih's) the kernels compute transposed (0.6 ms for torch's strided adds), and three
hand-overs to the helper thread (50 us each). Here each core's thread runs its share of the whole step in one
hand-over: its batch rows' forward, then their loss, its gradient and the output layer's gradients (compiled,
`native.output_loss`), then their backward, and after meeting the other thread, its hidden units' share of W_hh's
gradient. The SGD step adds the transposed gradients in tiles. The arithmetic is the autograd path's: the mean
cross-entropy, every parameter's gradient, torch's global-norm clip (coefficient max_norm / (norm + 1e-6), at most 1)
and plain SGD; tests/test_fused.py checks the two against each other.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from rnnlm import native, recurrence
from rnnlm.model import RNNLM, State


def applies(model: RNNLM, optimizer: torch.optim.Optimizer, tokens: torch.Tensor, amp: bool) -> bool:
    """Whether `sgd_step` can take this training step: the LSTM's bf16 kernels serve it (`amp`, see
    `RNNLM.forward`) and the optimizer is plain SGD over exactly the model's parameters."""
    if not (amp and model.rnn_type == "lstm" and model.uses_kernels(tokens) and recurrence.bf16_enabled()):
        return False
    if type(optimizer) is not torch.optim.SGD or len(optimizer.param_groups) != 1:
        return False
    group = optimizer.param_groups[0]
    plain = not any(group.get(key) for key in ("momentum", "weight_decay", "nesterov", "maximize"))
    params = group["params"]
    return plain and len(params) == 6 and all(a is b for a, b in zip(params, model.parameters(), strict=False))


def sgd_step(model: RNNLM, tokens: torch.Tensor, targets: torch.Tensor, state: State, lr: float, max_norm: float):
    """One minibatch: forward, mean cross-entropy, backward, gradients clipped to global norm `max_norm`, SGD step
    with learning rate `lr`, all on the CPU. tokens, targets (batch, steps). Returns (the mean loss, a 0-d tensor;
    the last step's state), as `rnnlm.train`'s step does; the parameters' .grad are left untouched."""
    rnn, linear, (h0, c0) = model.rnn, model.linear, state
    w_ih, w_hh, b_ih, b_hh = rnn.weight_ih_l0, rnn.weight_hh_l0, rnn.bias_ih_l0, rnn.bias_hh_l0
    vocab, hidden = linear.weight.shape[0], model.num_hiddens
    targets = targets.T.contiguous()  # time-major, as the logits' rows
    loss, grad_b_out, grad_w_out = (
        torch.zeros(2, dtype=torch.float64),
        torch.zeros(2, vocab),
        torch.zeros(2, vocab, hidden),
    )
    with torch.no_grad():
        window = recurrence.BF16LSTMWindow(tokens.T, h0[0], c0[0], w_ih, w_hh, b_ih, b_hh, linear.weight, linear.bias)
        window.prepare_backward(window.logits)  # the forward's threads turn the logits into their gradient

        def stages(rows: tuple[int, int], units: tuple[int, int], meet: Callable[[], None]) -> None:
            party = int(rows[0] > 0)  # each thread sums into its own buffers
            window.forward(rows)
            native.output_loss(
                targets, window.hs, window.logits, loss[party], grad_b_out[party], grad_w_out[party], rows
            )
            window.backward_stages(rows, units, meet)

        recurrence.rows_then_units(tokens.shape[0], hidden, recurrence.overlap_enabled(), stages)
        _, _, grad_w_ih_t, grad_w_hh_t = window.grads()
        grad_b = grad_w_ih_t.sum(0)
        grads = [grad_w_hh_t, grad_w_ih_t, grad_b, grad_b, grad_w_out.sum(0), grad_b_out.sum(0)]
        norm = float(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))))
        alpha = -lr * min(max_norm / (norm + 1e-6), 1.0)
        native.add_transposed(grad_w_hh_t, alpha, w_hh)
        native.add_transposed(grad_w_ih_t, alpha, w_ih)
        torch._foreach_add_([b_ih, b_hh, linear.weight, linear.bias], grads[2:], alpha=alpha)
    mean_loss = (loss.sum() / targets.numel()).float()
    return mean_loss, (window.hs[-1][None], window.cs[-1][None])
