"""A hand-written tanh RNN for the CPU: torch's `nn.RNN` equations, with a backward pass built for speed.

torch's CPU `nn.RNN` records every time step for autograd, so its backward pass does two small matmuls per step.
Here the backward pass runs the recurrence for the gradients of the pre-activations only (one (batch, H) x (H, H)
matmul per step), then computes the recurrent weight's gradient for all steps at once with one large matmul, which
runs near the machine's matmul peak. Inputs arrive projected (`x_proj`: the one-hot product done as a row gather).
Results agree with `nn.RNN` to float32 rounding (tests/test_recurrence.py).

GRU and LSTM were written the same way and measured slower than torch's layers (the LSTM goes through oneDNN on the
CPU; a GRU step is a dozen small elementwise ops from Python), so they stay on torch's layers.
"""

from __future__ import annotations

import torch


class TanhRNN(torch.autograd.Function):
    """h_t = tanh(x_proj_t + h_{t-1} W_hh^T), with `x_proj` holding W_ih x_t + b_ih + b_hh."""

    @staticmethod
    def forward(ctx, x_proj: torch.Tensor, h0: torch.Tensor, w_hh: torch.Tensor) -> torch.Tensor:
        steps = x_proj.shape[0]
        hs = x_proj.new_empty((steps + 1, *h0.shape))  # (steps + 1, batch, H); hs[0] = h0
        hs[0] = h0
        w_t = w_hh.T
        for t in range(steps):
            torch.addmm(x_proj[t], hs[t], w_t, out=hs[t + 1]).tanh_()
        ctx.save_for_backward(hs, w_hh)
        return hs[1:]  # (steps, batch, H)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        hs, w_hh = ctx.saved_tensors
        steps, hidden = grad_out.shape[0], hs.shape[-1]
        deriv = 1 - hs[1:] * hs[1:]  # tanh' at every step: (steps, batch, H)
        grad_pre = torch.empty_like(grad_out)  # d loss / d (x_proj_t + h_{t-1} W_hh^T)
        dh = torch.zeros_like(hs[0])  # gradient reaching h_t from step t + 1
        for t in range(steps - 1, -1, -1):
            torch.mul(dh.add_(grad_out[t]), deriv[t], out=grad_pre[t])
            dh = grad_pre[t] @ w_hh  # (batch, H)
        grad_w = grad_pre.reshape(-1, hidden).T @ hs[:-1].reshape(-1, hidden)  # (H, H), all steps at once
        return grad_pre, dh, grad_w
