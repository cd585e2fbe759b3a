"""A whole training step of the bf16 LSTM (`amp` on CPUs with AVX512-BF16) in compiled code, without autograd.

Through autograd, a minibatch of the book's LSTM spent about 2.6 ms around its 2.9 ms of compiled windows: the loss
and its gradient as torch ops (0.25 ms), the output layer's weight gradient, the clipping norm, the SGD step (whose
two largest gradients, W_hh's and W_ih's, the kernels compute transposed: 0.6 ms for torch's strided adds), packing
the weights, three hand-overs to the helper thread (50 us each) and autograd itself. Here the whole step is one C
call on each core (kernels.c: rnnlm_lstm_sgd_bf16), and the two meet three times: after packing the weights, each
its half; after the forward, the loss, its gradient and the backward of each one's batch rows; after W_hh's gradient
for each one's hidden units and the other gradients summed, with their squares. Then each clips and updates its
share of the parameters. The arithmetic is the autograd path's: the mean cross-entropy, every parameter's gradient,
torch's global-norm clip (coefficient max_norm / (norm + 1e-6), at most 1) and plain SGD; tests/test_fused.py checks
the two against each other.
"""

from __future__ import annotations

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
    arrays = _arrays(model, tokens, targets, state)
    step = native.LSTMSGDStep.of(arrays, lr, max_norm)
    parties = 2 if recurrence.overlap_enabled() and step.batch >= 2 and step.H >= 2 else 1
    recurrence.in_parties(parties, step.party)
    mean_loss = (arrays["loss"][0::8].sum() / targets.numel()).float()
    return mean_loss, (arrays["hs"][-1][None], arrays["cs"][-1][None])


def _arrays(model: RNNLM, tokens: torch.Tensor, targets: torch.Tensor, state: State) -> dict[str, torch.Tensor]:
    """The tensors behind `native.LSTMSGDStep`'s pointers: inputs, parameters (updated in place), buffers."""
    rnn, linear, (h0, c0) = model.rnn, model.linear, state
    (batch, steps), hidden, vocab = tokens.shape, model.num_hiddens, model.vocab_size
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
        **recurrence.bf16_forward_buffers(steps, batch, hidden, vocab),
        **recurrence.bf16_backward_buffers(steps, batch, hidden, vocab),
        "loss": torch.zeros(16, dtype=torch.float64),
        "grad_b": torch.empty(4 * hidden),
        "grad_w_out": torch.zeros(2, vocab, hidden),
        "grad_b_out": torch.zeros(2, vocab),
    }
