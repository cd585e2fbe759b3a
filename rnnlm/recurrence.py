"""A hand-written tanh RNN over one-hot inputs for the CPU: torch's `nn.RNN` equations, built for speed.

torch's CPU `nn.RNN` records every time step for autograd: a matmul, an add and a tanh per step forward, two small
matmuls per step backward. Here:
- the one-hot input rides along in the recurrent matmul: each step is one oneDNN matmul of [h_{t-1} | one-hot x_t]
  (batch, H + V) by the packed [W_hh | W_ih], with the bias and the tanh fused in; that takes about 60% of the time
  of matmul + add + tanh as separate ops;
- the backward pass runs the recurrence for the gradients of the pre-activations only: one packed matmul per step,
  with the next step's incoming gradient added in the same call;
- the gradient of [W_hh | W_ih] for all steps is one matmul over the whole window, done in slices on a second core
  while the backward recurrence is still running (`overlap`), so little of it stays on the critical path.
Without oneDNN the same steps run as plain torch ops. Results agree with `nn.RNN` to float32 rounding
(tests/test_recurrence.py).

GRU and LSTM stay on torch's layers: its CPU LSTM is oneDNN's fused kernel already (see docs/benchmarks.md for how
close each model runs to this machine's matmul limit).
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import torch

Step = Callable[..., torch.Tensor]

_WEIGHT_GRAD_SLICES = 5  # with `overlap`, the weight gradient is summed over this many slices of time steps


def _onednn_available() -> bool:
    """Whether oneDNN's fused linear ops run here (x86 and ARM builds of torch have them; a few builds do not)."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        weight = torch.ops.mkldnn._reorder_linear_weight(torch.ones(2, 3), 1)
        out = torch.ops.mkldnn._linear_pointwise(torch.ones(1, 3), weight, torch.zeros(2), "tanh", [], "")
        return bool(torch.allclose(out, torch.full((1, 2), 3.0).tanh()))
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


ONEDNN = _onednn_available()


def tanh_linear(weight: torch.Tensor, bias: torch.Tensor, batch: int) -> Step:
    """x -> tanh(x @ weight.T + bias), the weight packed once for the `batch` rows every call has."""
    if ONEDNN:
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, batch)
        return lambda x: torch.ops.mkldnn._linear_pointwise(x, packed, bias, "tanh", [], "")
    return lambda x: torch.addmm(bias, x, weight.T).tanh_()


def linear_add(weight: torch.Tensor, batch: int) -> Step:
    """(x, other) -> x @ weight.T + other (other None: no addition), the weight packed once."""
    if ONEDNN:
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, batch)

        def step(x: torch.Tensor, other: torch.Tensor | None = None) -> torch.Tensor:
            if other is None:
                return torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
            return torch.ops.mkldnn._linear_pointwise.binary(x, other, packed, None, "add")

        return step
    return lambda x, other=None: x @ weight.T if other is None else torch.addmm(other, x, weight.T)


class _Helper:
    """One background thread for work off the critical path, on the second core (torch ops release the GIL)."""

    def __init__(self) -> None:
        self._pool: ThreadPoolExecutor | None = None

    def submit(self, fn: Callable[[], torch.Tensor]) -> Future:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(
                1, thread_name_prefix="rnnlm-grad", initializer=torch.set_num_threads, initargs=(1,)
            )
            atexit.register(self._pool.shutdown)
        return self._pool.submit(fn)


_helper = _Helper()


def overlap_enabled() -> bool:
    """Slices of the weight gradient go to the helper thread when torch computes on one thread and a core is free."""
    return torch.get_num_threads() == 1 and (os.cpu_count() or 1) > 1


class OneHotTanhRNN(torch.autograd.Function):
    """h_t = tanh(W_ih one_hot(x_t) + bias + W_hh h_{t-1}) for t = 1..steps; returns (steps, batch, H).

    `tokens` is (steps, batch) int64 and `bias` is b_ih + b_hh. The gradient reaches h0, W_ih, W_hh and the bias.
    """

    @staticmethod
    def forward(ctx, tokens, h0, w_ih, w_hh, bias, overlap: bool = False):
        steps, batch = tokens.shape
        hidden, vocab = w_ih.shape
        # z[t] = [h_{t-1} | one_hot(x_t)]: the input of step t, laid out for one matmul
        z = h0.new_zeros((steps, batch, hidden + vocab))
        z[:, :, hidden:].scatter_(2, tokens.unsqueeze(-1), 1.0)
        z[0, :, :hidden] = h0
        step = tanh_linear(torch.cat([w_hh, w_ih], 1), bias, batch)
        outputs = []
        for t in range(steps):
            outputs.append(step(z[t]))
            if t + 1 < steps:
                z[t + 1, :, :hidden] = outputs[-1]
        hs = torch.stack(outputs)  # (steps, batch, H), contiguous
        ctx.save_for_backward(z, w_hh, hs)
        ctx.overlap = overlap
        return hs

    @staticmethod
    def backward(ctx, grad_out):
        z, w_hh, hs = ctx.saved_tensors
        steps, batch, hidden = hs.shape
        grad_out = grad_out.contiguous()
        deriv = 1 - hs * hs  # tanh' at every step
        grad_pre = torch.empty_like(deriv)  # d loss / d (pre-activation of step t)
        inputs = z.reshape(steps * batch, -1)  # the rows each step's matmul saw

        def weight_grad(t0: int, t1: int) -> torch.Tensor:  # d loss / d [W_hh | W_ih] from steps t0..t1-1
            return grad_pre[t0:t1].reshape(-1, hidden).T @ inputs[t0 * batch : t1 * batch]

        back = linear_add(w_hh.T, batch)  # g -> g @ W_hh (+ the gradient arriving from the output at that step)
        cuts = set(range(0, steps, -(-steps // _WEIGHT_GRAD_SLICES))) if ctx.overlap else set()
        parts, end = [], steps
        torch.mul(grad_out[-1], deriv[-1], out=grad_pre[-1])
        for t in range(steps - 1, 0, -1):
            if t in cuts:  # steps t..end-1 are final: their share of the weight gradient goes to the helper
                parts.append(_helper.submit(lambda t0=t, t1=end: weight_grad(t0, t1)))
                end = t
            torch.mul(back(grad_pre[t], grad_out[t - 1]), deriv[t - 1], out=grad_pre[t - 1])
        grad_h0 = back(grad_pre[0])
        grad_w = weight_grad(0, end)
        for part in parts:
            grad_w += part.result()
        grad_bias = grad_pre.sum((0, 1))
        return None, grad_h0, grad_w[:, hidden:], grad_w[:, :hidden], grad_bias, None
