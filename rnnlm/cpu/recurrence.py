"""The compiled recurrences as autograd functions: torch's `nn.RNN`, `nn.GRU` and `nn.LSTM` equations and parameters
over one-hot inputs, each window (35 steps forward, or back) one call into `kernels.c`. Results agree with torch's
layers to float32 rounding (tests/speed/test_recurrence.py).

The input products are rows of W_ih.T + biases picked by the tokens; the recurrent matmul is register-blocked with
the gates fused in. The tanh RNN runs half the batch on each core; the GRU and LSTM split the hidden units, so that
each core's slice of W_hh stays in its L2 cache (`rnnlm.cpu.threads`). The weights' gradients are one large oneDNN
matmul over all steps. Under `amp` on CPUs with AVX512-BF16, the LSTM takes bf16 matmuls (`OneHotLSTMLogits`, the
output layer fused in): inputs rounded to bf16, products summed in float32, everything else float32.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from rnnlm.cpu import checks, native
from rnnlm.cpu.choice import quickest
from rnnlm.cpu.threads import by_rows, by_rows_then_units, by_units, helper, second_core_free


def _pack(weight: torch.Tensor, batch: int) -> torch.Tensor:
    """`weight` (out, in) in oneDNN's blocked layout for calls of `batch` rows."""
    return torch.ops.mkldnn._reorder_linear_weight(weight, batch)


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, post_op: str = "none") -> torch.Tensor:
    """oneDNN's x @ weight.T + bias, then `post_op` ('none' or 'tanh'), fused in one call."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, post_op, [], "")


def _onednn_available() -> bool:
    """Whether oneDNN's fused linear ops run here (x86 and ARM builds of torch have them; a few builds do not)."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        out = _linear(torch.ones(1, 3), _pack(torch.ones(2, 3), 1), torch.zeros(2), "tanh")
        return bool(torch.allclose(out, torch.full((1, 2), 3.0).tanh()))
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


ONEDNN = _onednn_available()


SPLIT_MACS = 1 << 24  # matmuls of at least this many multiply-adds go in halves on the two cores, on torch's matmul


def matmul_tn(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a.T @ b for 2-D a (n, p) and b (n, q): through oneDNN or torch's matmul, whichever is quicker for the shape on
    this machine (measured once, see `rnnlm.cpu.choice`); torch's for large ones (see `linear`)."""
    if not ONEDNN or a.numel() * b.shape[1] >= SPLIT_MACS:
        return a.T @ b
    return quickest(f"matmul_tn:{tuple(a.shape)}x{b.shape[1]}", onednn=lambda: _onednn_tn(a, b), torch=lambda: a.T @ b)


def _onednn_tn(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a.T @ b through oneDNN, which wants its left operand contiguous: the narrower of the two is transposed, and
    the result may be a transposed view."""
    if a.shape[1] <= b.shape[1]:
        return _linear(a.T.contiguous(), b.T, None)
    return _linear(b.T.contiguous(), a.T, None).T  # (b.T @ a).T


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ weight.T (+ bias): through oneDNN or torch's matmul, whichever is quicker for the shape here; for large
    ones torch's or the kernels' (`_large_linear`; oneDNN reorders an unpacked weight at every call, which its
    one-time measurement, on the same weight each time, does not see)."""
    if x.numel() * weight.shape[0] >= SPLIT_MACS:
        return _large_linear(x, weight, bias) if weight.is_contiguous() else _torch_linear(x, weight, bias)
    name = f"linear:{tuple(x.shape)}x{weight.shape[0]}{'+b' if bias is not None else ''}"
    return quickest(name, onednn=lambda: _linear(x, weight, bias), torch=lambda: _torch_linear(x, weight, bias))


def _torch_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """torch's x @ weight.T (+ bias), in one call."""
    return x @ weight.T if bias is None else torch.addmm(bias, x, weight.T)


def _large_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, torch_way=_torch_linear):
    """x @ weight.T (+ bias) for a large product: `torch_way` (torch's matmul) or the kernels' (`native.linear`),
    whichever is quicker for the shape here (on a 2-core Zen 3, the kernels' for a softmax's logits over a
    window's rows: docs/benchmarks.md). Outside autograd: the callers are autograd Functions' own steps."""
    plain = all(t is None or (t.dtype == torch.float32 and t.device.type == "cpu") for t in (x, weight, bias))
    if native.library() is None or not plain:
        return torch_way(x, weight, bias)
    name = f"linear-large:{tuple(x.shape)}x{weight.shape[0]}{'+b' if bias is not None else ''}"
    compiled = lambda: native.linear(x, weight, bias, torch.get_num_threads())  # noqa: E731
    return quickest(name, compiled=compiled, torch=lambda: torch_way(x, weight, bias))


def wide_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, block: int = 1024) -> torch.Tensor:
    """x @ weight.T (+ bias) for a weight with many rows (a large vocabulary's output layer): the kernels' over the
    whole width, or torch's matmul `block` output columns at a time (the shape it is quick at, where over the whole
    width it is not; up to two blocks' width, an adaptive softmax's head, in one call), whichever is quicker here
    (`_large_linear`)."""
    return _large_linear(x, weight, bias, lambda x, weight, bias: _torch_wide_linear(x, weight, bias, block))


def _torch_wide_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, block: int) -> torch.Tensor:
    """torch's x @ weight.T (+ bias), `block` output columns at a time beyond two blocks' width (measured quicker on
    a 2-core Xeon than one call)."""
    if weight.shape[0] <= 2 * block:
        return _torch_linear(x, weight, bias)
    result = x.new_empty(x.shape[0], weight.shape[0])
    for start in range(0, weight.shape[0], block):
        part = slice(start, start + block)
        result[:, part] = x @ weight[part].T if bias is None else torch.addmm(bias[part], x, weight[part].T)
    return result


class Linear(torch.autograd.Function):
    """x @ weight.T + bias, as `nn.Linear`, its three matmuls (forward, input and weight gradients) each through
    oneDNN or torch's matmul, whichever is quicker for its shape here, and in halves on two cores when large (a
    large vocabulary's output layer, an embedding's input product). Call only when `ONEDNN` holds."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.share = second_core_free() and x.shape[0] * x.shape[1] * weight.shape[0] >= SPLIT_MACS
        return _by_row_halves(x, ctx.share, lambda rows: linear(rows, weight, bias))

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad = grad.contiguous()
        grad_x = _by_row_halves(grad, ctx.share, lambda rows: linear(rows, weight.T, None))
        grad_w = _summed_halves(grad, x, ctx.share, matmul_tn)
        return grad_x, grad_w, grad.sum(0)


def _by_row_halves(x: torch.Tensor, share: bool, run: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """run(x) for a 2-D x, its rows in two halves at once, one on the helper thread, when `share`."""
    if not share:
        return run(x)
    half = x.shape[0] // 2
    first = helper.submit(lambda: run(x[:half]))
    second = run(x[half:])
    return torch.cat([first.result(), second])


def _summed_halves(a: torch.Tensor, b: torch.Tensor, share: bool, run: Callable) -> torch.Tensor:
    """run(a, b) for a product summed over rows (a.T @ b), the rows in two halves at once when `share`."""
    if not share:
        return run(a, b)
    half = a.shape[0] // 2
    first = helper.submit(lambda: run(a[:half], b[:half]))
    return run(a[half:], b[half:]).add_(first.result())


def with_h0(h0: torch.Tensor, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(states, hs): [h0, hs] as one (steps + 1, batch, H) array, and hs, its last steps, for a window's forward to
    write; W_hh's gradient is then one product over all the steps (`recurrent_weight_grad`)."""
    states = h0.new_empty((steps + 1, *h0.shape))
    states[0] = h0
    return states, states[1:]


def recurrent_weight_grad(grad: torch.Tensor, states: torch.Tensor, share: bool) -> torch.Tensor:
    """The gradient of W_hh, sum over steps t of grad[t].T @ h_{t-1}, for grad (steps, batch, G*H) and states = [h0,
    hs] (steps + 1, batch, H, `with_h0`): one product over all the steps' rows (a first step's product of 20 rows apart
    ran at a quarter of the speed), the rows in two halves at once when `share`."""
    return _summed_halves(_rows(grad), _rows(states[:-1]), share, matmul_tn)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """(steps, batch, n) as (steps * batch, n)."""
    return x.reshape(-1, x.shape[-1])


def token_grad(tokens: torch.Tensor, grad: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out[tokens[i]] += grad[i] (grad 2-D (rows, N), out (vocab, N), column slices allowed): the gradient of a
    weight whose rows the one-hot inputs pick (torch's CPU index_add_ takes 10x longer for these shapes). Every row
    of grad lands in exactly one row of out, so out.sum(0) is the input bias's gradient, from vocab rows instead of
    steps * batch."""
    return native.token_grad(tokens, grad, out)


def window_inputs(table, tokens, h0, w_hh, gates: int):
    """A window's inputs checked before its C calls (they index the table by token and trust every size): (table,
    tokens (None for dense inputs), h0), contiguous. The table has a row per token (or per input row) of `gates`
    blocks of H, h0 is (batch, H), W_hh (gates * H, H), tokens (steps, batch) ids of the table's rows."""
    h0 = checks.tensor(h0, "h0")
    if h0.dim() != 2 or h0.dtype != torch.float32:
        raise RuntimeError(f"h0 must be a float32 (batch, H) tensor, got {h0.dtype} {tuple(h0.shape)}")
    (batch, hidden), width = h0.shape, gates * h0.shape[1]
    table = checks.tensor(table, "table")
    if table.dim() != 2 or table.shape[1] != width or table.dtype != torch.float32:
        raise RuntimeError(f"the input table must be float32 (rows, {width}), got {table.dtype} {tuple(table.shape)}")
    if tuple(w_hh.shape) != (width, hidden):
        raise RuntimeError(f"W_hh must be ({width}, {hidden}), got {tuple(w_hh.shape)}")
    if tokens is None and table.shape[0] % max(batch, 1):
        raise RuntimeError(f"dense inputs need steps * {batch} rows, got {table.shape[0]}")
    tokens = checks.window_tokens(tokens, table.shape[0], batch)
    return table.detach().contiguous(), tokens, h0.contiguous()


def _table_grad(tokens: torch.Tensor | None, grad: torch.Tensor, rows: int) -> torch.Tensor:
    """The gradient of a window's input table from d loss / d (input product) `grad` (steps, batch, G): gathered back
    to the table's rows the tokens picked (one-hot inputs, `rows` = vocab), or, for dense inputs, grad itself as
    (steps * batch, G)."""
    flat = grad.reshape(-1, grad.shape[-1])
    return flat if tokens is None else token_grad(tokens, flat, flat.new_zeros((rows, flat.shape[1])))


class TanhRNN(torch.autograd.Function):
    """h_t = tanh(x_t + W_hh h_{t-1}) for t = 1..steps over one window; returns hs (steps, batch, H).

    x_t is the input product with both biases: row tokens[t] of `table` (W_ih.T + b_ih + b_hh, vocab x H) for
    one-hot inputs, or with tokens None the rows of `table` ((steps * batch) x H) for dense ones. The gradient
    reaches the table, h0 and W_hh. Each direction is one C call, the batch's halves on two cores when `share`."""

    @staticmethod
    def forward(ctx, table, tokens, h0, w_hh, share: bool = False):
        table, tokens, h0 = window_inputs(table, tokens, h0, w_hh, 1)
        steps, batch = tokens.shape if tokens is not None else (table.shape[0] // h0.shape[0], h0.shape[0])
        whh = native.pack(w_hh, trans=True)
        states, hs = with_h0(h0, steps)
        by_rows(batch, share, lambda rows: native.rnn_forward(tokens, h0, table, whh, hs, rows))
        ctx.save_for_backward(tokens, w_hh, states)
        ctx.rows, ctx.share = table.shape[0], share
        return hs

    @staticmethod
    def backward(ctx, grad_out):
        tokens, w_hh, states = ctx.saved_tensors
        h0, hs, batch = states[0], states[1:], states.shape[1]
        grad_out = grad_out.contiguous()
        whh = native.pack(w_hh, trans=False)
        g, grad_h0 = torch.empty_like(hs), torch.empty_like(h0)  # g: d loss / d (pre-activation of step t)
        by_rows(batch, ctx.share, lambda rows: native.rnn_backward(hs, grad_out, whh, g, grad_h0, rows))
        grad_w_hh = recurrent_weight_grad(g, states, ctx.share)
        return _table_grad(tokens, g, ctx.rows), None, grad_h0, grad_w_hh, None


class GRU(torch.autograd.Function):
    """torch's `nn.GRU` (gates r, z, n in that order) over one window; returns hs (steps, batch, H).

        r = sigmoid(W_ir x + b_ir + W_hr h + b_hr)      z = sigmoid(W_iz x + b_iz + W_hz h + b_hz)
        n = tanh(W_in x + b_in + r * (W_hn h + b_hn))   h' = (1 - z) * n + z * h

    W_ih x + b_ih comes from `table` (W_ih.T + b_ih picked by the tokens, or dense rows, as in `TanhRNN`). Each
    direction is one C call, the hidden units split between two cores when `share`; W_hh's gradient is one matmul
    over all steps."""

    @staticmethod
    def forward(ctx, table, tokens, h0, w_hh, b_hh, share: bool = False):
        table, tokens, h0 = window_inputs(table, tokens, h0, w_hh, 3)
        if tuple(b_hh.shape) != (table.shape[1],):
            raise RuntimeError(f"b_hh must be ({table.shape[1]},), got {tuple(b_hh.shape)}")
        b_hh = b_hh.detach().contiguous()
        steps, batch = tokens.shape if tokens is not None else (table.shape[0] // h0.shape[0], h0.shape[0])
        states, hs = with_h0(h0, steps)
        rz, n, h_n = hs.new_empty((*hs.shape[:2], 2 * hs.shape[2])), torch.empty_like(hs), torch.empty_like(hs)
        run = lambda *worker: native.gru_forward(tokens, h0, table, b_hh, w_hh.detach(), hs, rz, n, h_n, *worker)  # noqa: E731
        by_units(hs.shape[2], share, run)
        ctx.save_for_backward(tokens, w_hh, states, rz, n, h_n)
        ctx.rows, ctx.share = table.shape[0], share
        return hs

    @staticmethod
    def backward(ctx, grad_out):
        tokens, w_hh, states, rz, n, h_n = ctx.saved_tensors
        h0, hs = states[0], states[1:]
        steps, batch, hidden = hs.shape
        grad_out = grad_out.contiguous()
        grad_gates = hs.new_empty((steps, batch, 3 * hidden))  # d loss / d (W_hh h + b_hh)
        grad_pre_n, grad_h0 = torch.empty_like(hs), torch.empty_like(h0)  # d loss / d (W_in x + b_in), / d h0
        run = lambda *worker: native.gru_backward(  # noqa: E731
            h0, hs, rz, n, h_n, grad_out, w_hh.detach(), grad_gates, grad_pre_n, grad_h0, *worker
        )
        by_units(hidden, ctx.share, run)
        grad_w_hh = recurrent_weight_grad(grad_gates, states, ctx.share)
        # d loss / d (W_ih x + b_ih): the r and z columns of grad_gates, then grad_pre_n
        grad_table = torch.cat([grad_gates[..., : 2 * hidden], grad_pre_n], dim=-1)
        grad_b_hh = torch.cat([grad_gates[..., : 2 * hidden].sum((0, 1)), grad_gates[..., 2 * hidden :].sum((0, 1))])
        return _table_grad(tokens, grad_table, ctx.rows), None, grad_h0, grad_w_hh, grad_b_hh, None


class LSTM(torch.autograd.Function):
    """torch's `nn.LSTM` (gates i, f, g, o) over one window; returns (hs (steps, batch, H), c of the last step).

        [i f g o] = [sigmoid sigmoid tanh sigmoid](W_ih x + b_ih + W_hh h + b_hh)    c' = f c + i g    h' = o tanh(c')

    W_ih x + b_ih + b_hh comes from `table` (picked by the tokens, or dense rows, as in `TanhRNN`); each step is one
    register-blocked matmul of h by W_hh with the gates fused in, the hidden units' halves on two cores when
    `share`. The backward's step product is a sum of two parts, each half of the units' gate columns by W_hh's
    rows, a core's each (kernels.c: lstm_backward). W_hh's gradient is one matmul over all steps."""

    @staticmethod
    def forward(ctx, table, tokens, h0, c0, w_hh, share: bool = False):
        table, tokens, h0 = window_inputs(table, tokens, h0, w_hh, 4)
        if checks.tensor(c0, "c0").shape != h0.shape or c0.dtype != h0.dtype:
            raise RuntimeError(f"c0 must be float32 {tuple(h0.shape)} as h0, got {c0.dtype} {tuple(c0.shape)}")
        c0 = c0.contiguous()
        steps, batch = tokens.shape if tokens is not None else (table.shape[0] // h0.shape[0], h0.shape[0])
        states, hs = with_h0(h0, steps)
        hs, cs, gates, tcs = lstm_states(steps, batch, h0.shape[1], hs).values()
        run = lambda *worker: native.lstm_forward(  # noqa: E731
            tokens, h0, c0, table, w_hh.detach(), hs, cs, gates, tcs, *worker
        )
        by_units(hs.shape[2], share, run)
        ctx.save_for_backward(tokens, c0, w_hh, states, cs, gates, tcs)
        ctx.rows, ctx.share = table.shape[0], share
        return hs, cs[-1]

    @staticmethod
    def backward(ctx, grad_out, grad_c_last):
        tokens, c0, w_hh, states, cs, gates, tcs = ctx.saved_tensors
        h0, hidden = states[0], states.shape[2]
        grad_out = grad_out.contiguous()
        grad_c_last = torch.zeros_like(c0) if grad_c_last is None else grad_c_last.contiguous()
        grad_gates = gates.new_empty(gates.shape)  # d loss / d gates before their activations
        grad_h0, grad_c0 = torch.empty_like(h0), torch.empty_like(c0)
        exchange = native.lstm_exchange(*h0.shape)  # the two workers' parts of each step's product
        run = lambda *worker: native.lstm_backward(  # noqa: E731
            c0, cs, gates, tcs, grad_out, grad_c_last, w_hh.detach(), grad_gates, grad_h0, grad_c0, exchange, *worker
        )
        by_units(hidden, ctx.share, run)
        grad_w_hh = recurrent_weight_grad(grad_gates, states, ctx.share)
        return _table_grad(tokens, grad_gates, ctx.rows), None, grad_h0, grad_c0, grad_w_hh, None


def lstm_states(steps: int, batch: int, hidden: int, hs: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """An LSTM window's saved states: hs (the one given, e.g. `with_h0`'s, else a new one), cs, gates (after their
    activations, 4H wide) and tcs = tanh(cs)."""
    empty = lambda width: torch.empty(steps, batch, width, dtype=torch.float32)  # noqa: E731
    return {
        "hs": empty(hidden) if hs is None else hs,
        "cs": empty(hidden),
        "gates": empty(4 * hidden),
        "tcs": empty(hidden),
    }


def bf16_forward_buffers(steps: int, batch: int, hidden: int, vocab: int) -> dict[str, torch.Tensor]:
    """What the bf16 LSTM's forward window writes, named as kernels.c's struct lstm_sgd_step names it: the states,
    hs16 (bf16 of [h0, hs], rows of even length) and the logits (steps * batch, vocab)."""
    return {
        **lstm_states(steps, batch, hidden),
        "hs16": torch.empty((steps + 1, batch, native.even(hidden)), dtype=torch.bfloat16),
        "logits": torch.empty(steps * batch, vocab),
    }


def bf16_backward_buffers(steps: int, batch: int, hidden: int, vocab: int) -> dict[str, torch.Tensor]:
    """What the bf16 LSTM's backward writes, named as kernels.c's struct lstm_sgd_step names it: gpanels (the gate
    gradients in bf16, for W_hh's), grad_h0, grad_c0, grad_w_hh_t (W_hh's gradient transposed, (H, 4H padded to
    whole panels)) and token_grad (each of two threads' sums of gate gradients by input token, zeros)."""
    return {
        "gpanels": native.pair_panels(steps * batch, 4 * hidden),
        "grad_h0": torch.empty(batch, hidden),
        "grad_c0": torch.empty(batch, hidden),
        "grad_w_hh_t": native.scratch(hidden, 4 * hidden).view(hidden, -1),
        "token_grad": torch.zeros(2, vocab, 4 * hidden),
    }


class BF16LSTMWindow:
    """One window of the bf16 LSTM with its output layer (see `OneHotLSTMLogits`), in stages that each run over a
    share of the work, so that two threads can share the buffers: `forward` and `backward` over batch rows,
    `weight_grad` over hidden units (W_hh's gradient needs every row's gate gradients: it starts after both threads'
    backward). The forward's buffers are made here, the backward's by `prepare_backward`."""

    def __init__(self, tokens, h0, c0, w_ih, w_hh, b_ih, b_hh, w_out, b_out):
        emb = w_ih.T + b_ih + b_hh  # row v: W_ih one_hot(v) plus both biases
        self.emb, self.tokens, self.h0 = window_inputs(emb, tokens, h0, w_hh, 4)
        if tuple(c0.shape) != tuple(h0.shape) or w_out.shape[1] != h0.shape[1] or b_out.shape != w_out.shape[:1]:
            raise RuntimeError(f"c0 must be as h0 {tuple(h0.shape)}, W_out (vocab, {h0.shape[1]}), b_out (vocab,)")
        self.c0 = c0.contiguous()
        self.w_hh, self.w_out, self.vocab = w_hh.detach(), w_out.detach(), w_out.shape[0]
        self.buffers = bf16_forward_buffers(*self.tokens.shape, self.h0.shape[1], self.vocab)
        self.whh16, self.wout = native.pack_bf16(w_hh, trans=True), native.pack(w_out, trans=True)
        self.b_out = b_out.detach().contiguous()

    def forward(self, rows: tuple[int, int]) -> None:
        """logits, hs, cs (and what the backward needs) for batch rows `rows`."""
        b = self.buffers
        native.lstm_forward_bf16(
            self.tokens, self.h0, self.c0, self.emb, self.whh16, self.wout, self.b_out, b["hs16"],
            b["hs"], b["cs"], b["gates"], b["tcs"], b["logits"], rows,
        )  # fmt: skip

    def prepare_backward(self, grad_logits, grad_h_last=None, grad_c_last=None) -> None:
        """The backward's inputs (the last state's gradients None: zeros) and buffers."""
        self.buffers |= bf16_backward_buffers(*self.tokens.shape, self.h0.shape[1], self.vocab)
        self.grad_logits = grad_logits.contiguous()
        self.grad_h_last = torch.zeros_like(self.h0) if grad_h_last is None else grad_h_last.contiguous()
        self.grad_c_last = torch.zeros_like(self.c0) if grad_c_last is None else grad_c_last.contiguous()
        self.whh16_back, self.wout_back = native.pack_bf16(self.w_hh, trans=False), native.pack(self.w_out, trans=False)

    def backward(self, rows: tuple[int, int]) -> None:
        """grad_h0, grad_c0 and the gate gradients (by token, and in bf16 for W_hh's) for batch rows `rows`."""
        b = self.buffers
        native.lstm_backward_bf16(
            self.tokens, self.c0, b["cs"], b["gates"], b["tcs"], self.grad_logits, self.wout_back, self.grad_h_last,
            self.grad_c_last, self.whh16_back, b["gpanels"], b["token_grad"][int(rows[0] > 0)], b["grad_h0"],
            b["grad_c0"], rows,
        )  # fmt: skip

    def weight_grad(self, units: tuple[int, int]) -> None:
        """Rows `units` of W_hh's gradient transposed: sum over steps t of h_{t-1}.T @ the gate gradients of step
        t, from bf16 products summed in float32."""
        hs = self.buffers["hs"]
        h_prev = hs[:-1].reshape(-1, hs.shape[2])  # with h0 in front: what step t multiplied by W_hh
        native.weight_grad_bf16(self.h0, h_prev, self.buffers["gpanels"], self.buffers["grad_w_hh_t"], units)

    def backward_stages(self, rows: tuple[int, int], units: tuple[int, int], barrier: Callable[[], None]) -> None:
        """One worker's share of the whole backward (see `by_rows_then_units`)."""
        self.backward(rows)
        barrier()  # W_hh's gradient needs every row's gate gradients
        self.weight_grad(units)

    def grads(self) -> tuple[torch.Tensor, ...]:
        """After the backward: (grad_h0, grad_c0, W_ih's gradient transposed (vocab, 4H), W_hh's transposed (H, 4H),
        a view of padded rows). The biases' gradient is the third's sum over its rows."""
        b, hidden = self.buffers, self.h0.shape[1]
        return b["grad_h0"], b["grad_c0"], b["token_grad"].sum(0), b["grad_w_hh_t"][:, : 4 * hidden]


class OneHotLSTMLogits(torch.autograd.Function):
    """`OneHotLSTM` with bf16 matmuls (`amp` on CPUs with AVX512-BF16), the output layer fused in; returns (logits
    (steps * batch, vocab), time-major as the model's, h and c of the last step (batch, H)).

    The recurrent matmuls (both windows' and W_hh's gradient) take bf16 inputs and sum in float32, as autocast does
    on GPUs; the gates, state, output layer, loss and SGD stay float32. W_hh is then half the size and fits one
    core's L2, so the two cores take half the batch each instead of meeting at every step. The output layer's logits,
    and the gradient they send back to h, are computed inside the windows a step at a time (three skinny matmuls over
    the window cost more than the windows' work for them). `rnnlm.fused` runs the same windows without autograd."""

    @staticmethod
    def forward(ctx, tokens, h0, c0, w_ih, w_hh, b_ih, b_hh, w_out, b_out, share: bool = False):
        window = BF16LSTMWindow(tokens, h0, c0, w_ih, w_hh, b_ih, b_hh, w_out, b_out)
        by_rows(tokens.shape[1], share, window.forward)
        ctx.save_for_backward(w_ih, w_hh, w_out)  # their versions are checked: the window holds copies
        logits = window.buffers.pop("logits")  # an output held by its own node would be a reference cycle
        ctx.window, ctx.share = window, share
        return logits, window.buffers["hs"][-1], window.buffers["cs"][-1]

    @staticmethod
    def backward(ctx, grad_logits, grad_h_last, grad_c_last):
        ctx.saved_tensors  # noqa: B018  (raises if a weight changed in place since the forward)
        window, hs = ctx.window, ctx.window.buffers["hs"]
        _, batch, hidden = hs.shape
        window.prepare_backward(grad_logits, grad_h_last, grad_c_last)
        by_rows_then_units(batch, hidden, ctx.share, window.backward_stages)
        grad_h0, grad_c0, grad_w_ih_t, grad_w_hh_t = window.grads()
        grad_b, grad_logits = grad_w_ih_t.sum(0), window.grad_logits
        grad_w_out = matmul_tn(grad_logits, hs.reshape(-1, hidden))  # (vocab, H)
        return (
            None, grad_h0, grad_c0, grad_w_ih_t.T, grad_w_hh_t.T, grad_b, grad_b, grad_w_out, grad_logits.sum(0), None
        )  # fmt: skip
