"""Hand-written recurrences over one-hot inputs for the CPU: torch's `nn.RNN`, `nn.GRU` and `nn.LSTM` equations
and parameters, built for speed. Results agree with torch's layers to float32 rounding (tests/test_recurrence.py).

torch's CPU layers record every time step for autograd (a matmul, an add and a nonlinearity per step forward, small
matmuls per step backward), each a Python-level call of 10-40 us around about 20 us of arithmetic. Three kernels, the
first that works here is used:

1. Compiled (`rnnlm/kernels.c` through `rnnlm.native`; tanh RNN, GRU, LSTM): a whole window of 35 steps is one C
   call, forward or backward, with the recurrent matmul register-blocked (about 230 GFLOP/s a core on AVX-512) and
   the gates fused in. The input products are rows of W_ih.T + biases picked by the tokens. With a second core free
   (`overlap`), the RNN runs half the batch on each core; the GRU and LSTM split the hidden units instead, so that
   each core's slice of W_hh stays in its L2 cache, and the two meet once per step.
2. oneDNN (tanh RNN and GRU): one packed oneDNN matmul per step with the bias and nonlinearity fused in; the weight
   gradient summed in slices on a second core while the backward recurrence runs.
3. Plain torch ops, the same steps as 2, where the torch build has no oneDNN.

In every kernel the weights' gradients are one large matmul over all steps (oneDNN's, about 2x torch's matmul on
AMD CPUs), not small ones per step. docs/benchmarks.md has the measurements and the machine's matmul limit.

Under `amp` on CPUs with AVX512-BF16, the LSTM's compiled kernels take bf16 matmuls (`OneHotLSTMLogits`, with the
output layer fused in): inputs rounded to bf16, products summed in float32 (vdpbf16ps), everything else float32.
"""

from __future__ import annotations

import atexit
import itertools
import os
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from rnnlm import native

Step = Callable[..., torch.Tensor]

_WEIGHT_GRAD_SLICES = 5  # with `overlap`, the weight gradient is summed over this many slices of time steps


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


def tanh_linear(weight: torch.Tensor, bias: torch.Tensor, batch: int) -> Step:
    """x -> tanh(x @ weight.T + bias), the weight packed once for the `batch` rows every call has."""
    if ONEDNN:
        packed = _pack(weight, batch)
        return lambda x: _linear(x, packed, bias, "tanh")
    return lambda x: torch.addmm(bias, x, weight.T).tanh_()


def linear_add(weight: torch.Tensor, batch: int, bias: torch.Tensor | None = None) -> Step:
    """(x, other) -> x @ weight.T + bias + other (other None: no addition), the weight packed once."""
    if ONEDNN:
        packed = _pack(weight, batch)

        def step(x: torch.Tensor, other: torch.Tensor | None = None) -> torch.Tensor:
            if other is None:
                return _linear(x, packed, bias)
            return torch.ops.mkldnn._linear_pointwise.binary(x, other, packed, bias, "add")

        return step

    def plain(x: torch.Tensor, other: torch.Tensor | None = None) -> torch.Tensor:
        out = x @ weight.T if bias is None else torch.addmm(bias, x, weight.T)
        return out if other is None else out.add_(other)

    return plain


class _Helper:
    """One background thread on the second core, for half of a compiled window or a slice of a weight gradient
    (torch ops and ctypes calls release the GIL)."""

    def __init__(self) -> None:
        self._pool: ThreadPoolExecutor | None = None

    def submit(self, fn: Callable[[], object]) -> Future:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(
                1, thread_name_prefix="rnnlm-helper", initializer=torch.set_num_threads, initargs=(1,)
            )
            atexit.register(self._pool.shutdown)
        return self._pool.submit(fn)


_helper = _Helper()


NATIVE = True  # use the compiled kernels where they build (tests turn this off to check the other kernels)


def native_enabled() -> bool:
    """Whether the compiled kernels (rnnlm/kernels.c) serve the tanh RNN, GRU and LSTM here."""
    return NATIVE and native.library() is not None


def bf16_enabled() -> bool:
    """Whether the compiled kernels' bf16 matmuls run at bf16 speed here (AVX512-BF16): where they do not, `amp` on
    the CPU keeps the LSTM's float32 kernels, which are then quicker."""
    return native_enabled() and native.bf16_native()


def overlap_enabled() -> bool:
    """Whether the helper thread takes a share of the work (half a compiled window, slices of a weight gradient):
    when torch computes on one thread and a second core is free."""
    return torch.get_num_threads() == 1 and (os.cpu_count() or 1) > 1


def matmul_tn(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a.T @ b for 2-D a (n, p) and b (n, q), through oneDNN when present (about 2x torch's matmul on AMD CPUs).
    oneDNN wants its left operand contiguous: the narrower of the two is transposed, and the result may be a
    transposed view."""
    if not ONEDNN:
        return a.T @ b
    if a.shape[1] <= b.shape[1]:
        return _linear(a.T.contiguous(), b.T, None)
    return _linear(b.T.contiguous(), a.T, None).T  # (b.T @ a).T


class Linear(torch.autograd.Function):
    """x @ weight.T + bias, as `nn.Linear`, with all three matmuls (forward, input and weight gradients) through
    oneDNN: the output layer's shapes (a few thousand rows, a vocabulary of tens of columns) run at about 40% of the
    speed through torch's matmul on AMD CPUs. Call only when `ONEDNN` holds."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        return _linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad = grad.contiguous()
        return _linear(grad, weight.T, None), matmul_tn(grad, x), grad.sum(0)


def _by_halves(batch: int, overlap: bool, run: Callable[[tuple[int, int]], None]) -> None:
    """run((r0, r1)) over the batch rows: in two halves at once, one on the helper thread, when `overlap`."""
    rows = _halves(batch, 2 if overlap and batch >= 2 else 1)
    if len(rows) == 1:
        run(rows[0])
        return
    other = _helper.submit(lambda: run(rows[0]))
    run(rows[1])
    other.result()


def _by_units(hidden: int, overlap: bool, prepare: Callable[..., Callable[[], None]]) -> None:
    """Run a compiled GRU/LSTM window: prepare(units, me, parties, flags) returns one party's call. With `overlap`
    the hidden units are halved between this thread and the helper thread, which meet at every step."""
    units = _halves(hidden, 2 if overlap and hidden >= 2 else 1)
    in_parties(len(units), lambda me, parties, flags: prepare(units[me], me, parties, flags))


def _halves(n: int, parties: int) -> list[tuple[int, int]]:
    """[0, n) in `parties` (1 or 2) ranges."""
    return [(0, n)] if parties == 1 else [(0, n // 2), (n // 2, n)]


def in_parties(parties: int, prepare: Callable[[int, int, torch.Tensor | None], Callable[[], None]]) -> None:
    """Run prepare(me, parties, flags)'s call for each party (1 or 2): party 0 here, party 1 on the helper thread,
    sharing `flags` to meet (see kernels.c: step_done). A party that fails sets the abort flag, so that its partner
    stops waiting for it."""
    if parties == 1:
        prepare(0, 1, None)()
        return
    flags = torch.zeros(24, dtype=torch.int64)  # each party's finished steps, a cache line apart; then "abort"
    mine, theirs = prepare(0, 2, flags), prepare(1, 2, flags)

    def guarded(call: Callable[[], None]) -> None:
        try:
            call()
        except BaseException:
            flags[16] = 1  # the partner stops waiting for this party
            raise

    other = _helper.submit(lambda: guarded(theirs))
    try:
        guarded(mine)
    finally:
        other.result()


def rows_then_units(batch: int, hidden: int, overlap: bool, run: Callable[..., None]) -> None:
    """run(rows, units, meet) on each party, with `overlap` one per core, so that a sequence of stages costs one
    hand-over to the helper thread: stages over batch rows `rows`, then, after `meet()` (which returns once every
    party has called it), stages over hidden units `units`."""
    parties = 2 if overlap and batch >= 2 and hidden >= 2 else 1
    rows, units = _halves(batch, parties), _halves(hidden, parties)

    def prepare(me: int, parties: int, flags: torch.Tensor | None) -> Callable[[], None]:
        meetings = itertools.count(1)

        def meet() -> None:
            if parties > 1 and native.meet(flags, me, parties, next(meetings)):
                raise RuntimeError("the other party of a compiled window failed")

        return lambda: run(rows[me], units[me], meet)

    in_parties(parties, prepare)


def matmul_tn_halves(a: torch.Tensor, b: torch.Tensor, overlap: bool) -> torch.Tensor:
    """a.T @ b (see `matmul_tn`), the rows summed in two halves at once when `overlap`."""
    if not overlap or a.shape[0] < 2:
        return matmul_tn(a, b)
    half = a.shape[0] // 2
    first = _helper.submit(lambda: matmul_tn(a[:half], b[:half]))
    return matmul_tn(a[half:], b[half:]).add_(first.result())


def recurrent_weight_grad(grad: torch.Tensor, h0: torch.Tensor, hs: torch.Tensor, overlap: bool) -> torch.Tensor:
    """The gradient of W_hh, sum over steps t of grad[t].T @ h_{t-1}, for grad (steps, batch, G*H), the outputs hs
    (steps, batch, H) and the initial state h0 (batch, H): one matmul over all steps, in halves when `overlap`."""
    h_prev = torch.cat([h0[None], hs[:-1]]).reshape(-1, hs.shape[-1])  # what step t multiplied by W_hh
    return matmul_tn_halves(grad.reshape(-1, grad.shape[-1]), h_prev, overlap)


def token_grad(tokens: torch.Tensor, grad: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out[tokens[i]] += grad[i] (grad 2-D (rows, N), out (vocab, N), column slices allowed): the gradient of a
    weight whose rows the one-hot inputs pick; compiled where the kernels are (torch's CPU index_add_ takes 10x
    longer for these shapes). Every row of grad lands in exactly one row of out, so out.sum(0) is the input bias's
    gradient, from vocab rows instead of steps * batch."""
    if native_enabled():
        return native.token_grad(tokens, grad, out)
    return out.index_add_(0, tokens.reshape(-1), grad)


class WeightGrad:
    """sum over steps t of grad[t].T @ inputs[t] (grad: (steps, batch, G), inputs: (steps, batch, K)), the gradient
    of a weight that every step multiplies. With `overlap`, slices of steps are summed on the helper thread as soon
    as the backward recurrence (running from the last step down) has finished them; call `finished(t)` after step
    t's rows of `grad` are final, and `total()` at the end."""

    def __init__(self, grad: torch.Tensor, inputs: torch.Tensor, overlap: bool):
        steps = grad.shape[0]
        self.grad, self.inputs = grad.reshape(-1, grad.shape[-1]), inputs.reshape(-1, inputs.shape[-1])
        self.batch = grad.shape[1]
        self.cuts = set(range(1, steps, -(-steps // _WEIGHT_GRAD_SLICES))) if overlap else set()
        self.parts: list[Future] = []
        self.end = steps

    def _slice(self, t0: int, t1: int) -> torch.Tensor:
        rows = slice(t0 * self.batch, t1 * self.batch)
        return matmul_tn(self.grad[rows], self.inputs[rows])

    def finished(self, t: int) -> None:
        if t in self.cuts:
            self.parts.append(_helper.submit(lambda t0=t, t1=self.end: self._slice(t0, t1)))
            self.end = t

    def total(self) -> torch.Tensor:
        result = self._slice(0, self.end)
        for part in self.parts:
            result += part.result()
        return result


class OneHotTanhRNN(torch.autograd.Function):
    """h_t = tanh(W_ih one_hot(x_t) + bias + W_hh h_{t-1}) for t = 1..steps; returns (steps, batch, H).

    `tokens` is (steps, batch) int64 and `bias` is b_ih + b_hh. The gradient reaches h0, W_ih, W_hh and the bias.
    """

    @staticmethod
    def forward(ctx, tokens, h0, w_ih, w_hh, bias, overlap: bool = False):
        ctx.overlap, ctx.native = overlap, native_enabled()
        if ctx.native:
            return OneHotTanhRNN._native_forward(ctx, tokens, h0, w_ih, w_hh, bias)
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
        return hs

    @staticmethod
    def _native_forward(ctx, tokens, h0, w_ih, w_hh, bias):
        """The compiled window (rnnlm/kernels.c), the batch's halves on two cores when `overlap`."""
        tokens, h0 = tokens.contiguous(), h0.contiguous()
        emb = (w_ih.T + bias).contiguous()  # (vocab, H): row v is W_ih one_hot(v) + bias
        whh = native.pack(w_hh, trans=True)
        hs = h0.new_empty((*tokens.shape, h0.shape[1]))  # (steps, batch, H)
        _by_halves(tokens.shape[1], ctx.overlap, lambda rows: native.rnn_forward(tokens, h0, emb, whh, hs, rows))
        ctx.save_for_backward(tokens, h0, w_hh, hs)
        ctx.vocab = w_ih.shape[1]
        return hs

    @staticmethod
    def _native_backward(ctx, grad_out):
        tokens, h0, w_hh, hs = ctx.saved_tensors
        steps, batch, hidden = hs.shape
        grad_out = grad_out.contiguous()
        whh = native.pack(w_hh, trans=False)
        g, grad_h0 = torch.empty_like(hs), torch.empty_like(h0)  # g: d loss / d (pre-activation of step t)
        _by_halves(batch, ctx.overlap, lambda rows: native.rnn_backward(hs, grad_out, whh, g, grad_h0, rows))
        grad_w_hh = recurrent_weight_grad(g, h0, hs, ctx.overlap)
        flat = g.reshape(-1, hidden)
        grad_w_ih = token_grad(tokens, flat, flat.new_zeros((ctx.vocab, hidden)))  # (vocab, H)
        return None, grad_h0, grad_w_ih.T, grad_w_hh, grad_w_ih.sum(0), None

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.native:
            return OneHotTanhRNN._native_backward(ctx, grad_out)
        z, w_hh, hs = ctx.saved_tensors
        steps, batch, hidden = hs.shape
        grad_out = grad_out.contiguous()
        deriv = 1 - hs * hs  # tanh' at every step
        grad_pre = torch.empty_like(deriv)  # d loss / d (pre-activation of step t)
        weight_grad = WeightGrad(grad_pre, z, ctx.overlap)  # d loss / d [W_hh | W_ih]: z[t] is what step t saw
        back = linear_add(w_hh.T, batch)  # g -> g @ W_hh (+ the gradient arriving from the output at that step)
        torch.mul(grad_out[-1], deriv[-1], out=grad_pre[-1])
        for t in range(steps - 1, 0, -1):
            weight_grad.finished(t)
            torch.mul(back(grad_pre[t], grad_out[t - 1]), deriv[t - 1], out=grad_pre[t - 1])
        grad_h0 = back(grad_pre[0])
        grad_w = weight_grad.total()
        grad_bias = grad_pre.sum((0, 1))
        return None, grad_h0, grad_w[:, hidden:], grad_w[:, :hidden], grad_bias, None


class OneHotGRU(torch.autograd.Function):
    """torch's `nn.GRU` (gates r, z, n in that order) over one-hot inputs; returns (steps, batch, H).

        r = sigmoid(W_ir x + b_ir + W_hr h + b_hr)      z = sigmoid(W_iz x + b_iz + W_hz h + b_hz)
        n = tanh(W_in x + b_in + r * (W_hn h + b_hn))   h' = (1 - z) * n + z * h

    The input products are a row gather for all steps at once. Compiled (`native_enabled()`): each direction of
    the window is one C call, the hidden units split between two cores when `overlap`. Otherwise each step is one
    packed matmul of h by W_hh (bias fused) and five elementwise ops, and the backward pass precomputes every
    derivative that does not depend on the incoming gradient for all steps at once, so that each step is four
    products, one addcmul and one packed matmul. Either way the weights' gradients are one matmul each over all
    steps."""

    @staticmethod
    def forward(ctx, tokens, h0, w_ih, w_hh, b_ih, b_hh, overlap: bool = False):
        ctx.overlap, ctx.native = overlap, native_enabled()
        if ctx.native:
            return OneHotGRU._native_forward(ctx, tokens, h0, w_ih, w_hh, b_ih, b_hh)
        steps, batch = tokens.shape
        hidden = w_hh.shape[1]
        x_gates = torch.nn.functional.embedding(tokens, w_ih.T) + b_ih  # (steps, batch, 3H)
        step = linear_add(w_hh, batch, b_hh)
        rz = x_gates.new_empty((steps, batch, 2 * hidden))
        n = x_gates.new_empty((steps, batch, hidden))
        hs = x_gates.new_empty((steps + 1, batch, hidden))  # hs[0] = h0
        hs[0] = h0
        h_gates = []
        for t in range(steps):
            gh = step(hs[t])  # (batch, 3H): W_hh h + b_hh
            h_gates.append(gh)
            torch.add(x_gates[t, :, : 2 * hidden], gh[:, : 2 * hidden], out=rz[t]).sigmoid_()
            torch.addcmul(x_gates[t, :, 2 * hidden :], rz[t, :, :hidden], gh[:, 2 * hidden :], out=n[t]).tanh_()
            torch.lerp(n[t], hs[t], rz[t, :, hidden:], out=hs[t + 1])  # n + z * (h - n)
        h_n = torch.stack([gh[:, 2 * hidden :] for gh in h_gates])  # W_hn h + b_hn, which r multiplied
        ctx.save_for_backward(tokens, w_ih, w_hh, hs, rz, n, h_n)
        return hs[1:]

    @staticmethod
    def _native_forward(ctx, tokens, h0, w_ih, w_hh, b_ih, b_hh):
        """The compiled window (rnnlm/kernels.c), the hidden units' halves on two cores when `overlap`."""
        tokens, h0, b_hh = tokens.contiguous(), h0.contiguous(), b_hh.detach().contiguous()
        emb = (w_ih.T + b_ih).contiguous()  # (vocab, 3H): row v is W_ih one_hot(v) + b_ih
        w_hh = w_hh.detach()
        hs = h0.new_empty((*tokens.shape, h0.shape[1]))  # (steps, batch, H)
        rz, n, h_n = hs.new_empty((*hs.shape[:2], 2 * hs.shape[2])), torch.empty_like(hs), torch.empty_like(hs)
        run = lambda *party: native.gru_forward(tokens, h0, emb, b_hh, w_hh, hs, rz, n, h_n, *party)  # noqa: E731
        _by_units(hs.shape[2], ctx.overlap, run)
        ctx.save_for_backward(tokens, h0, w_ih, w_hh, hs, rz, n, h_n)
        return hs

    @staticmethod
    def _native_backward(ctx, grad_out):
        tokens, h0, w_ih, w_hh, hs, rz, n, h_n = ctx.saved_tensors
        steps, batch, hidden = hs.shape
        grad_out = grad_out.contiguous()
        grad_gates = hs.new_empty((steps, batch, 3 * hidden))  # d loss / d (W_hh h + b_hh)
        grad_pre_n, grad_h0 = torch.empty_like(hs), torch.empty_like(h0)  # d loss / d (W_in x + b_in), / d h0
        run = lambda *party: native.gru_backward(  # noqa: E731
            h0, hs, rz, n, h_n, grad_out, w_hh.detach(), grad_gates, grad_pre_n, grad_h0, *party
        )
        _by_units(hidden, ctx.overlap, run)
        grad_w_hh = recurrent_weight_grad(grad_gates, h0, hs, ctx.overlap)
        grad_w_ih, grad_b_ih = _gru_input_grads(tokens, w_ih, grad_gates, grad_pre_n)
        return None, grad_h0, grad_w_ih, grad_w_hh, grad_b_ih, _gru_b_hh_grad(grad_b_ih, grad_gates), None

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.native:
            return OneHotGRU._native_backward(ctx, grad_out)
        tokens, w_ih, w_hh, hs, rz, n, h_n = ctx.saved_tensors
        steps, batch, hidden = n.shape
        grad_out = grad_out.contiguous()
        r, z, h_prev = rz[..., :hidden], rz[..., hidden:], hs[:-1]
        # d h' / d pre_n, d h' / d pre_z, d pre_n / d pre_r per unit of incoming gradient, for all steps at once
        to_pre_n = (1 - z) * (1 - n * n)
        to_pre_z = (h_prev - n) * z * (1 - z)
        n_to_pre_r = h_n * r * (1 - r)
        grad_gates = torch.empty((steps, batch, 3 * hidden), dtype=n.dtype)  # d loss / d (W_hh h + b_hh)
        grad_pre_n = torch.empty_like(n)  # d loss / d pre_n, which is d loss / d (W_in x + b_in)
        weight_grad = WeightGrad(grad_gates, h_prev.contiguous(), ctx.overlap)
        back = linear_add(w_hh.T, batch)  # g -> g @ W_hh (+ what reaches h directly)
        dh = grad_out[-1]
        for t in range(steps - 1, -1, -1):
            torch.mul(dh, to_pre_n[t], out=grad_pre_n[t])
            torch.mul(dh, to_pre_z[t], out=grad_gates[t, :, hidden : 2 * hidden])
            torch.mul(grad_pre_n[t], n_to_pre_r[t], out=grad_gates[t, :, :hidden])
            torch.mul(grad_pre_n[t], r[t], out=grad_gates[t, :, 2 * hidden :])
            direct = torch.addcmul(grad_out[t - 1], dh, z[t]) if t > 0 else dh * z[t]  # through z * h, plus output
            dh = back(grad_gates[t], direct)
            weight_grad.finished(t)
        grad_w_ih, grad_b_ih = _gru_input_grads(tokens, w_ih, grad_gates, grad_pre_n)
        return None, dh, grad_w_ih, weight_grad.total(), grad_b_ih, _gru_b_hh_grad(grad_b_ih, grad_gates), None


def _gru_input_grads(tokens, w_ih, grad_gates, grad_pre_n) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradients of W_ih and b_ih. d loss / d (W_ih x + b_ih) is the r and z columns of grad_gates (steps,
    batch, 3H), then grad_pre_n (steps, batch, H); W_ih's is that gathered back to the rows the tokens picked."""
    hidden = grad_pre_n.shape[-1]
    grad_w_ih = w_ih.new_zeros(w_ih.T.shape)  # (vocab, 3H)
    for cols, grad in ((slice(0, 2 * hidden), grad_gates[..., : 2 * hidden]), (slice(2 * hidden, None), grad_pre_n)):
        token_grad(tokens, grad.reshape(-1, grad.shape[-1]), grad_w_ih[:, cols])
    return grad_w_ih.T, grad_w_ih.sum(0)


def _gru_b_hh_grad(grad_b_ih: torch.Tensor, grad_gates: torch.Tensor) -> torch.Tensor:
    """b_hh's gradient: b_ih's for the r and z gates (both biases add to the same sums), then the n gate's own sum
    (b_hn sits inside r * (W_hn h + b_hn))."""
    hidden = grad_gates.shape[-1] // 3
    return torch.cat([grad_b_ih[: 2 * hidden], grad_gates[..., 2 * hidden :].sum((0, 1))])


class OneHotLSTM(torch.autograd.Function):
    """torch's `nn.LSTM` (gates i, f, g, o) over one-hot inputs, compiled kernels only (`native_enabled()`); returns
    (outputs (steps, batch, H), c of the last step (batch, H)).

        [i f g o] = [sigmoid sigmoid tanh sigmoid](W_ih x + b_ih + W_hh h + b_hh)    c' = f c + i g    h' = o tanh(c')

    The input products are rows of W_ih.T + b_ih + b_hh picked by the tokens; each step is one register-blocked
    matmul of h by W_hh with the gates fused in (rnnlm/kernels.c), the hidden units' halves on two cores when
    `overlap`. W_hh's gradient is one matmul over all steps."""

    @staticmethod
    def forward(ctx, tokens, h0, c0, w_ih, w_hh, b_ih, b_hh, overlap: bool = False):
        tokens, h0, c0, emb, (hs, cs, gates, tcs) = _lstm_window(tokens, h0, c0, w_ih, b_ih, b_hh)
        run = lambda *party: native.lstm_forward(  # noqa: E731
            tokens, h0, c0, emb, w_hh.detach(), hs, cs, gates, tcs, *party
        )
        _by_units(hs.shape[2], overlap, run)
        ctx.save_for_backward(tokens, h0, c0, w_ih, w_hh, hs, cs, gates, tcs)
        ctx.overlap = overlap
        return hs, cs[-1]

    @staticmethod
    def backward(ctx, grad_out, grad_c_last):
        tokens, h0, c0, w_ih, w_hh, hs, cs, gates, tcs = ctx.saved_tensors
        steps, batch, hidden = hs.shape
        grad_out = grad_out.contiguous()
        grad_c_last = torch.zeros_like(c0) if grad_c_last is None else grad_c_last.contiguous()
        grad_gates = gates.new_empty(gates.shape)  # d loss / d gates before their activations
        grad_h0, grad_c0 = torch.empty_like(h0), torch.empty_like(c0)
        run = lambda *party: native.lstm_backward(  # noqa: E731
            c0, cs, gates, tcs, grad_out, grad_c_last, w_hh.detach(), grad_gates, grad_h0, grad_c0, *party
        )
        _by_units(hidden, ctx.overlap, run)
        flat = grad_gates.reshape(-1, 4 * hidden)
        grad_w_hh = recurrent_weight_grad(grad_gates, h0, hs, ctx.overlap)
        grad_w_ih = token_grad(tokens, flat, flat.new_zeros((w_ih.shape[1], 4 * hidden)))  # (vocab, 4H)
        grad_b = grad_w_ih.sum(0)
        return None, grad_h0, grad_c0, grad_w_ih.T, grad_w_hh, grad_b, grad_b, None


def _lstm_window(tokens, h0, c0, w_ih, b_ih, b_hh) -> tuple:
    """What both LSTM kernels start from: tokens, h0, c0 contiguous; emb (vocab, 4H), whose row v is W_ih one_hot(v)
    plus both biases; and the buffers hs, cs, gates, tanh(cs) for the window ((steps, batch, H), gates 4H wide)."""
    emb = (w_ih.T + b_ih + b_hh).contiguous()
    states = _lstm_states(*tokens.shape, h0.shape[1])
    return tokens.contiguous(), h0.contiguous(), c0.contiguous(), emb, tuple(states.values())


def _lstm_states(steps: int, batch: int, hidden: int) -> dict[str, torch.Tensor]:
    """An LSTM window's saved states: hs, cs, gates (after their activations, 4H wide) and tcs = tanh(cs)."""
    shapes = {"hs": hidden, "cs": hidden, "gates": 4 * hidden, "tcs": hidden}
    return {name: torch.empty(steps, batch, width, dtype=torch.float32) for name, width in shapes.items()}


def bf16_forward_buffers(steps: int, batch: int, hidden: int, vocab: int) -> dict[str, torch.Tensor]:
    """What the bf16 LSTM's forward window writes, named as kernels.c's struct lstm_sgd_step names it: the states,
    hs16 (bf16 of [h0, hs], rows of even length) and the logits (steps * batch, vocab)."""
    return {
        **_lstm_states(steps, batch, hidden),
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
        self.tokens, self.h0, self.c0 = tokens.contiguous(), h0.contiguous(), c0.contiguous()
        self.emb = (w_ih.T + b_ih + b_hh).contiguous()  # row v: W_ih one_hot(v) plus both biases
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

    def backward_stages(self, rows: tuple[int, int], units: tuple[int, int], meet: Callable[[], None]) -> None:
        """One party's share of the whole backward (see `rows_then_units`)."""
        self.backward(rows)
        meet()  # W_hh's gradient needs every row's gate gradients
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
    def forward(ctx, tokens, h0, c0, w_ih, w_hh, b_ih, b_hh, w_out, b_out, overlap: bool = False):
        window = BF16LSTMWindow(tokens, h0, c0, w_ih, w_hh, b_ih, b_hh, w_out, b_out)
        _by_halves(tokens.shape[1], overlap, window.forward)
        ctx.save_for_backward(w_ih, w_hh, w_out)  # their versions are checked: the window holds copies
        logits = window.buffers.pop("logits")  # an output held by its own node would be a reference cycle
        ctx.window, ctx.overlap = window, overlap
        return logits, window.buffers["hs"][-1], window.buffers["cs"][-1]

    @staticmethod
    def backward(ctx, grad_logits, grad_h_last, grad_c_last):
        ctx.saved_tensors  # noqa: B018  (raises if a weight changed in place since the forward)
        window, hs = ctx.window, ctx.window.buffers["hs"]
        _, batch, hidden = hs.shape
        window.prepare_backward(grad_logits, grad_h_last, grad_c_last)
        rows_then_units(batch, hidden, ctx.overlap, window.backward_stages)
        grad_h0, grad_c0, grad_w_ih_t, grad_w_hh_t = window.grads()
        grad_b, grad_logits = grad_w_ih_t.sum(0), window.grad_logits
        grad_w_out = matmul_tn(grad_logits, hs.reshape(-1, hidden))  # (vocab, H)
        return (
            None, grad_h0, grad_c0, grad_w_ih_t.T, grad_w_hh_t.T, grad_b, grad_b, grad_w_out, grad_logits.sum(0), None
        )  # fmt: skip
