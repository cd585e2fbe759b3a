"""Whole training steps without autograd: the compiled windows, the output layer and the loss, clip and SGD.

`float32_step` (the one-layer tanh RNN, GRU and LSTM in float32) calls the windows of `rnnlm.cpu.recurrence` forward
and backward itself, the output layer with its loss and gradients in one C call per core, and torch's clip and SGD
in one C call; for the LSTM and the tanh RNN with a small output layer the whole step is one C call per core
(kernels.c: rnnlm_lstm_sgd_f32, rnnlm_rnn_sgd_f32; W_hh's gradient one K-blocked matmul over the window).
`sgd_step`, the bf16 LSTM's (`amp` on CPUs with AVX512-BF16), is one C call on each core (kernels.c:
rnnlm_lstm_sgd_bf16): each packs its half of the weights; runs the forward, the loss and its gradient and the
backward of its batch rows; computes W_hh's gradient for its hidden units and its share of the other gradients with
their squares; then clips and updates its share of the parameters, the workers waiting for each other three times in
between. The arithmetic of all is the autograd path's: the mean cross-entropy, torch's global-norm clip (coefficient
max_norm / (norm + 1e-6), at most 1) and plain SGD (tests/speed/test_fused.py).
"""

from __future__ import annotations

from collections.abc import Callable
from copy import deepcopy
from types import SimpleNamespace

import torch
from torch import nn

from rnnlm.cpu import checks, native, recurrence, threads
from rnnlm.cpu.recurrence import (
    GRU,
    LSTM,
    TanhRNN,
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


SMALL_OUTPUT = 1 << 16  # output layers up to this many weights (vocab x H) run all in C; larger ones on torch's matmuls


def step_params(model) -> dict[str, torch.Tensor]:
    """The six parameters a whole step of a one-layer model updates, by their names in the model."""
    rnn, linear = model.rnn, model.linear
    names = ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0")
    return {**{f"rnn.{name}": getattr(rnn, name) for name in names}, "linear.weight": linear.weight,
            "linear.bias": linear.bias}  # fmt: skip


def checked_step(model, tokens, targets, state):
    """A whole step's inputs checked before any C call, as torch's layers would check them (`checks.window`), and
    the model's parameters contiguous (the step updates them in place): (tokens, targets, state, the parameters)."""
    tokens, state, targets, ignored = checks.window(model, tokens, state, targets)
    if ignored:
        raise checks.IdOutOfRange(f"Target {checks.IGNORE_INDEX} is out of bounds (the fused step has no ignore_index)")
    checks.ids(tokens, "tokens", model.rnn.input_size, "the vocabulary")
    params = step_params(model)
    for name, param in params.items():
        if not param.is_contiguous() or param.dtype != torch.float32:
            layout = "contiguous" if param.is_contiguous() else "non-contiguous"
            raise RuntimeError(f"{name} must be a contiguous float32 tensor (the fused step updates it in place), "
                               f"got a {layout} {param.dtype} one")  # fmt: skip
    return tokens, targets, state, list(params.values())


class _Saved:
    """What autograd's ctx is to a window's forward and backward, when the engine calls them itself."""

    def save_for_backward(self, *tensors: torch.Tensor) -> None:
        self.saved_tensors = tensors


@torch.no_grad()
def float32_step(model, tokens: torch.Tensor, targets: torch.Tensor, state, lr: float, max_norm: float):
    """One minibatch of the one-layer tanh RNN, GRU or LSTM in float32: forward window, output layer, mean
    cross-entropy, backward, gradients clipped to global norm `max_norm`, SGD step with learning rate `lr`.
    tokens, targets (batch, steps), checked first (`checked_step`). Returns (the mean loss, a 0-d tensor; the last
    state), as the trainer's autograd step does; the parameters' .grad are left untouched."""
    tokens, targets, state, params = checked_step(model, tokens, targets, state)
    rnn, out, share = model.rnn, model.linear, threads.second_core_free()
    if not isinstance(rnn, nn.GRU) and out.out_features * rnn.hidden_size <= SMALL_OUTPUT:
        return _whole_float32_step(model, tokens, targets, state, params, lr, max_norm, share)
    hs, last_state, backward = _forward(rnn, tokens.T.contiguous(), state, share, _Saved())
    grad_h = torch.empty_like(hs)
    grad_w, grad_b, loss = output_step(
        out, hs.view(-1, hs.shape[-1]), targets.T.contiguous(), grad_h.view(-1, hs.shape[-1]), share
    )
    grads = [*backward(grad_h), grad_w, grad_b]
    native.clip_sgd([p.detach() for p in params], [g.contiguous() for g in grads], lr, max_norm)
    return (loss / targets.numel()).float(), last_state


def _whole_float32_step(model, tokens, targets, state, params, lr: float, max_norm: float, share: bool):
    """`float32_step` of the one-layer LSTM or tanh RNN with a small output layer: one C call per core (kernels.c:
    rnnlm_lstm_sgd_f32, rnnlm_rnn_sgd_f32)."""
    rnn, linear = model.rnn, model.linear
    (batch, steps), hidden, vocab = tokens.shape, rnn.hidden_size, linear.out_features
    lstm, rows = isinstance(rnn, nn.LSTM), steps * batch
    gates = 4 if lstm else 1
    h0, c0 = state if lstm else (state, None)
    workers = 2 if share and hidden >= 2 and batch >= 2 else 1
    states = recurrence.lstm_states(steps, batch, hidden) if lstm else {"hs": torch.empty(steps, batch, hidden)}
    arrays = {
        "tokens": tokens.T.contiguous(),
        "targets": targets.T.contiguous(),  # time-major, as the logits' rows
        "h0": h0[0].contiguous(),
        "c0": c0[0].contiguous() if lstm else None,
        "zeros": torch.zeros(batch, hidden) if lstm else None,
        **dict(zip(("w_ih", "w_hh", "b_ih", "b_hh", "w_out", "b_out"), (p.detach() for p in params), strict=True)),
        "emb": torch.empty(vocab, gates * hidden),
        "wout_fwd": native.packed(hidden, vocab),
        "wout_back": native.packed(vocab, hidden),
        "whh_fwd": None if lstm else native.packed(hidden, hidden),
        "whh_back": None if lstm else native.packed(hidden, hidden),
        **{name: states.get(name) for name in ("hs", "cs", "gates", "tcs")},
        "logits": torch.empty(rows, native.padded(vocab)),
        "grad_h": torch.empty(rows, hidden),
        "grad_gates": torch.empty(2 * batch if lstm else rows, gates * hidden),  # the LSTM's: two steps' rows
        "hprev": native.packed(rows, hidden),
        "grad_w_hh": torch.empty(gates * hidden, native.padded(hidden)),
        "loss": torch.zeros(16, dtype=torch.float64),
        "token_grad": torch.empty(vocab, gates * hidden),
        "grad_b": torch.empty(gates * hidden),
        "grad_w_out": torch.empty(workers, vocab, hidden),
        "grad_b_out": torch.empty(workers, vocab),
    }
    step = (native.LSTMFloat32Step if lstm else native.RNNFloat32Step).of(arrays, lr, max_norm)
    threads.on_workers(workers, step.worker)
    mean_loss = (arrays["loss"][0::8].sum() / targets.numel()).float()
    last = arrays["hs"][-1][None]
    return mean_loss, ((last, arrays["cs"][-1][None]) if lstm else last)


def output_step(out: nn.Linear, hs: torch.Tensor, targets: torch.Tensor, grad_h: torch.Tensor | None, share: bool):
    """The output layer's forward, the summed cross-entropy of `targets` (rows of hs, time-major) and every gradient,
    in one C call per core (each half of the rows), without keeping the logits: fills grad_h (the gradient reaching
    hs, for a loss that is the mean over the rows) and returns (W_out's gradient, b_out's, the summed loss, 0-d).
    With grad_h None, the loss only (and None for the gradients). The C calls index the logits by target: the
    targets are checked first (one int64 per row of hs, each a row of W_out)."""
    rows, vocab = hs.shape[0], out.out_features
    if targets.dtype != torch.int64 or targets.numel() != rows or hs.shape[1] != out.weight.shape[1]:
        raise ValueError(f"the output layer takes {rows} int64 targets for hs {tuple(hs.shape)} and W_out "
                         f"{tuple(out.weight.shape)}, got {targets.dtype} {tuple(targets.shape)}")  # fmt: skip
    axes = ("step", "row") if targets.dim() == 2 else ("index",)  # time-major windows, or their rows flat
    checks.ids(targets, "targets", vocab, "the output layer's classes", axes=axes)
    if vocab * hs.shape[1] > SMALL_OUTPUT:
        return _large_output_step(out, hs, targets, grad_h, share)
    logits = torch.empty(rows, native.padded(vocab))
    loss, grad_b = torch.zeros(16, dtype=torch.float64), out.bias.new_zeros(2, vocab)
    grad_w = out.weight.new_zeros(2, *out.weight.shape) if grad_h is not None else None
    wout, bias = native.pack(out.weight, trans=True), out.bias.detach().contiguous()
    wout_back = native.pack(out.weight, trans=False) if grad_h is not None else None

    def half(span: tuple[int, int]) -> None:
        me = int(span[0] > 0)
        worker_grad_w = None if grad_w is None else grad_w[me]
        native.output_step(
            hs, wout, bias, wout_back, targets, logits, loss[8 * me :], grad_b[me], worker_grad_w,
            grad_h, span,
        )  # fmt: skip

    threads.by_rows(rows, share, half)
    if grad_w is None:
        return None, None, loss.sum()
    return grad_w.sum(0), grad_b.sum(0), loss.sum()


def _large_output_step(out: nn.Linear, hs: torch.Tensor, targets: torch.Tensor, grad_h, share: bool):
    """`output_step` for a large output layer: each core takes half the rows all the way (its logits through torch's
    or oneDNN's matmul, cache-blocked for large matrices; the loss and its gradient in C; the gradients reaching hs
    and W_out), so that the logits are never joined and the halves meet once. Without the helper thread (`share`
    off: torch's threads do the matmuls), the loss's two halves run on torch's two OpenMP threads where
    `threads.team_free`."""
    weight, bias = out.weight.detach(), out.bias.detach()
    loss, grad_b = torch.zeros(16, dtype=torch.float64), bias.new_zeros(2, out.out_features)
    grad_w, scale = [None, None], 1.0 / targets.numel()

    def half(span: tuple[int, int]) -> None:
        me, rows = int(span[0] > 0), slice(*span)
        logits = recurrence.wide_linear(hs[rows], weight, bias)  # (rows, vocab), this half's only
        if span[1] - span[0] == hs.shape[0]:  # all rows on this thread: the loss in halves, on torch's threads
            native.rows_loss_halves(logits, targets, scale, loss, grad_b, threads.team_free())
        else:
            native.rows_loss(logits, targets[rows], scale, loss[8 * me :], grad_b[me], (0, span[1] - span[0]))
        if grad_h is not None:
            grad_h[rows] = recurrence.linear(logits, weight.T, None)
            grad_w[me] = recurrence.matmul_tn(logits, hs[rows])

    threads.by_rows(hs.shape[0], share, half)
    if grad_h is None:
        return None, None, loss.sum()
    total_w = grad_w[0] if grad_w[1] is None else grad_w[0].add_(grad_w[1])
    return total_w, grad_b.sum(0), loss.sum()


@torch.no_grad()
def summed_loss(out: nn.Linear, hs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The summed cross-entropy of `targets` under the output layer over `hs` (rows, H), without gradients (a 0-d
    float tensor): evaluation's."""
    return output_step(out, hs.contiguous(), targets.contiguous(), None, threads.second_core_free())[2].float()


def layer_of(weight: torch.Tensor, bias: torch.Tensor) -> SimpleNamespace:
    """An output layer's weights as `output_step` reads them (an nn.Linear's attributes), outside autograd."""
    return SimpleNamespace(weight=weight.detach(), bias=bias.detach(), out_features=weight.shape[0])


class OutputLoss(torch.autograd.Function):
    """The summed cross-entropy of `targets` (rows,) under the output layer W_out, b_out over `hs` (rows, H), its
    gradients computed with it (`output_step`) and scaled in the backward: the logits are never kept."""

    @staticmethod
    def forward(ctx, hs, w_out, b_out, targets):
        layer = layer_of(w_out, b_out)
        hs, targets = hs.detach().contiguous(), targets.contiguous()
        grad_h = torch.empty_like(hs)
        grad_w, grad_b, total = output_step(layer, hs, targets, grad_h, threads.second_core_free())
        ctx.grads, ctx.rows = (grad_h, grad_w, grad_b), targets.numel()
        return total.float()

    @staticmethod
    def backward(ctx, grad_total):
        grad_h, grad_w, grad_b = ctx.grads
        scale = grad_total * ctx.rows  # output_step's gradients are of the mean: the sum's are rows times them
        return grad_h * scale, grad_w * scale, grad_b * scale, None


def _forward(rnn: nn.Module, tokens: torch.Tensor, state, share: bool, saved: _Saved):
    """A one-hot window forward: (outputs (steps, batch, H), the last state, backward(grad_h) -> the gradients of
    W_ih, W_hh, b_ih and b_hh)."""
    w_ih, w_hh, b_ih, b_hh = rnn.weight_ih_l0, rnn.weight_hh_l0, rnn.bias_ih_l0, rnn.bias_hh_l0
    if isinstance(rnn, nn.GRU):
        hs = GRU.forward(saved, w_ih.T + b_ih, tokens, state[0], w_hh, b_hh, share)

        def gru_grads(grad_h):
            grad_table, _, _, grad_w_hh, grad_b_hh, _ = GRU.backward(saved, grad_h)
            return grad_table.T, grad_w_hh, grad_table.sum(0), grad_b_hh

        return hs, hs[-1:], gru_grads
    table = w_ih.T + b_ih + b_hh  # row v: the one-hot input v's product with both biases
    if isinstance(rnn, nn.LSTM):
        (h0, c0) = state
        hs, c_last = LSTM.forward(saved, table, tokens, h0[0], c0[0], w_hh, share)
        backward = lambda grad_h: LSTM.backward(saved, grad_h, None)  # noqa: E731
        last = (hs[-1:], c_last[None])
    else:
        hs = TanhRNN.forward(saved, table, tokens, state[0], w_hh, share)
        backward, last = (lambda grad_h: TanhRNN.backward(saved, grad_h)), hs[-1:]

    def grads(grad_h):
        results = backward(grad_h)  # (grad_table, None, grad_h0, [grad_c0,] grad_w_hh, None)
        grad_table, grad_w_hh = results[0], results[-2]
        return grad_table.T, grad_w_hh, grad_table.sum(0), grad_table.sum(0)

    return hs, last, grads


def lstm_candidates(
    model,
    batch: int,
    steps: int,
    torch_threads_default: int,
    engine_loss: Callable,
    engine_threads: int = 1,
    bf16: bool = False,
) -> dict:
    """Two ways to train a copy of this LSTM model for a minibatch, each as it would run: 'compiled' (the engine on
    `engine_threads` torch threads, with the helper thread where that is one: `float32_step` where it applies, or
    with `bf16` the engine's bf16 `sgd_step`, else `engine_loss` through autograd) and 'torch'
    (`model.forward_torch`, torch's layers, through autograd on `torch_threads_default` threads); with `bf16`, each
    forward pass under CPU autocast, as amp trains; for `rnnlm.cpu.choice` to time."""
    copy = deepcopy(model).train()
    tokens, targets = text_like_ids(copy.vocab_size, (batch, steps)), text_like_ids(copy.vocab_size, (batch, steps))
    state = copy.begin_state(batch)
    plain = getattr(copy, "embedding", None) is None and getattr(copy, "linear", None) is not None
    one_layer_one_hot = copy.rnn.num_layers == 1 and plain

    def compiled() -> None:
        with threads.torch_threads(engine_threads), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            if one_layer_one_hot and not getattr(getattr(copy, "drop", None), "p", 0.0):
                (sgd_step if bf16 else float32_step)(copy, tokens, targets, state, 0.0, 1.0)
            else:
                engine_loss(copy, tokens, targets, state)[0].backward()

    def torch_layer() -> None:
        with threads.torch_threads(torch_threads_default), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            if getattr(copy, "linear", None) is None:  # an output layer the engine leaves to torch either way
                outputs, _ = copy.hidden_torch(tokens, state)
                copy.adaptive.loss(outputs, targets.T.reshape(-1)).backward()
                return
            logits, _ = copy.forward_torch(tokens, state)
            torch.nn.functional.cross_entropy(logits, targets.T.reshape(-1)).backward()

    return {"compiled": compiled, "torch": torch_layer}


def text_like_ids(vocab: int, shape: tuple[int, int]) -> torch.Tensor:
    """Token ids drawn as a text's words fall by frequency rank (Zipf's law: rank r, from 1, with probability
    proportional to 1 / r), the order of a vocabulary built from a corpus: an adaptive softmax's targets then land in
    its head and clusters nearer to training (kjv-best.toml on kjv.txt: one target in twenty falls in the clusters,
    one in five of these ids, five in six of uniform ids), so that its cost, the same on both paths, does not drown
    their difference."""
    weights = 1.0 / torch.arange(1, vocab + 1, dtype=torch.float64)
    return torch.multinomial(weights, shape[0] * shape[1], replacement=True).view(shape)


def sgd_step(model, tokens: torch.Tensor, targets: torch.Tensor, state, lr: float, max_norm: float):
    """One minibatch: forward, mean cross-entropy, backward, gradients clipped to global norm `max_norm`, SGD step
    with learning rate `lr`, all on the CPU. tokens, targets (batch, steps). Returns (the mean loss, a 0-d tensor;
    the last step's state), as the trainer's autograd step does; the parameters' .grad are left untouched. The
    inputs are checked first (`checked_step`)."""
    tokens, targets, state, params = checked_step(model, tokens, targets, state)
    arrays = _arrays(model, tokens, targets, state, params)
    step = native.LSTMSGDStep.of(arrays, lr, max_norm)
    workers = 2 if threads.second_core_free() and step.batch >= 2 and step.H >= 2 else 1
    threads.on_workers(workers, step.worker)
    mean_loss = (arrays["loss"][0::8].sum() / targets.numel()).float()
    return mean_loss, (arrays["hs"][-1][None], arrays["cs"][-1][None])


def _arrays(model, tokens: torch.Tensor, targets: torch.Tensor, state, params) -> dict[str, torch.Tensor]:
    """The tensors behind `native.LSTMSGDStep`'s pointers: inputs, parameters (updated in place), buffers."""
    rnn, linear, (h0, c0) = model.rnn, model.linear, state
    (batch, steps), hidden, vocab = tokens.shape, rnn.hidden_size, linear.out_features
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
