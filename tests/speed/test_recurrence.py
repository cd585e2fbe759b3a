"""The CPU engine's compiled RNN, GRU and LSTM against torch's `nn.RNN` / `nn.GRU` / `nn.LSTM`: same outputs,
states and gradients; and when the engine serves a model."""

import gc
import weakref

import pytest
import torch

from rnnlm import cpu
from rnnlm.cpu import native, recurrence, threads
from rnnlm.model import RNNLM, matmul_precision

needs_build = pytest.mark.skipif(not cpu.compiled(), reason="no C compiler here: the compiled kernels are not built")


def _run(model, tokens, state, compiled: bool, monkeypatch):
    model.zero_grad()
    state = tuple(s.clone().requires_grad_() for s in state)
    monkeypatch.setattr(cpu, "ENABLED", compiled)
    assert cpu.handles(model, tokens) == compiled
    logits, new_state = model(tokens, state if len(state) == 2 else state[0])
    parts = new_state if isinstance(new_state, tuple) else (new_state,)
    loss = (logits * torch.linspace(-1, 1, logits.shape[-1])).square().sum() + sum(p.sum() * 3 for p in parts)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    grads |= {f"state{i}": s.grad for i, s in enumerate(state)}  # the gradient reaching the initial state
    return logits.detach(), [p.detach() for p in parts], grads


# the book's one-hot model; deeper; with an embedding; with tied weights (embedding_dim == num_hiddens); with an
# adaptive softmax (its head tied to the embedding)
ADAPTIVE = {"embedding_dim": 16, "tie_weights": True, "num_layers": 2, "adaptive_cutoffs": [4, 8]}
SHAPES = {"one-hot": {}, "two-layers": {"num_layers": 2}, "embedding": {"embedding_dim": 7}, "tied": {}}
SHAPES["adaptive"] = ADAPTIVE


@needs_build
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("rnn", ["rnn", "gru", "lstm"])
def test_the_model_on_the_engine_equals_torch_layers(rnn, shape, monkeypatch):
    """The model's forward and loss on the engine and on torch's layers: the same logits, last state, loss and every
    gradient (parameters and initial state), for the book's model and the deeper, embedded, tied and adaptive ones."""
    torch.manual_seed(0)
    options = SHAPES[shape] if shape != "tied" else {"embedding_dim": 16, "tie_weights": True, "num_layers": 2}
    model = RNNLM(11, 16, rnn, **options)
    tokens, targets = torch.randint(0, 11, (3, cpu.MIN_STEPS)), torch.randint(0, 11, (3, cpu.MIN_STEPS))
    state = model.begin_state(3)
    state = tuple(torch.randn_like(s) for s in (state if isinstance(state, tuple) else (state,)))
    ours, theirs = _run(model, tokens, state, True, monkeypatch), _run(model, tokens, state, False, monkeypatch)
    torch.testing.assert_close(ours[0], theirs[0])
    for a, b in zip(ours[1], theirs[1], strict=True):
        torch.testing.assert_close(a, b)
    assert ours[2].keys() == theirs[2].keys()
    for name in ours[2]:  # to float32 rounding of the largest entry (the adaptive softmax's log-probs make them large)
        scale = theirs[2][name].abs().max().clamp(min=1)
        torch.testing.assert_close(ours[2][name] / scale, theirs[2][name] / scale, msg=name)
    losses = [_loss_and_grads(model, tokens, targets, state, compiled, monkeypatch) for compiled in (True, False)]
    torch.testing.assert_close(losses[0][0], losses[1][0])
    for name in losses[1][1]:
        torch.testing.assert_close(losses[0][1][name], losses[1][1][name], msg=name)


def _loss_and_grads(model, tokens, targets, state, compiled: bool, monkeypatch):
    """model.loss (the output layer and cross-entropy fused on the engine) and the gradients it sends back."""
    model.zero_grad()
    monkeypatch.setattr(cpu, "ENABLED", compiled)
    loss, _ = model.loss(tokens, targets, state if len(state) == 2 else state[0])
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@needs_build
def test_the_engine_serves_float32_tanh_rnn_gru_and_lstm_layers(monkeypatch):
    tokens = torch.zeros(2, cpu.MIN_STEPS, dtype=torch.int64)
    assert not cpu.handles(RNNLM(5, 4, "rnn"), tokens[:, :1])  # one step (generation): torch's layer is faster
    for rnn in ("rnn", "gru", "lstm"):
        assert cpu.handles(RNNLM(5, 4, rnn), tokens)
        assert cpu.handles(RNNLM(5, 4, rnn, num_layers=2, embedding_dim=3, dropout=0.2), tokens)
        assert not cpu.handles(RNNLM(5, 4, rnn).double(), tokens)
    relu = RNNLM(5, 4, "rnn")
    relu.rnn.nonlinearity = "relu"
    assert cpu.why_not(relu, tokens) == "the kernels take tanh RNN, GRU and LSTM layers, not RNN"
    monkeypatch.setattr(cpu, "ENABLED", False)  # RNNLM_NATIVE=0, or no compiler: torch's layers
    assert not cpu.handles(RNNLM(5, 4, "rnn"), tokens)


@needs_build
@pytest.mark.parametrize("rnn", ["rnn", "gru", "lstm"])
def test_dropout_is_off_in_evaluation_and_the_engine_draws_it_as_torch_would_in_training(rnn, monkeypatch):
    """In evaluation the model is deterministic (the same output twice) on either path; in training, dropout changes
    the output, and the engine and torch's layers agree under the same seed where their dropout masks are drawn in
    the same order (one layer: only the embedding's and the output's)."""
    torch.manual_seed(0)
    model = RNNLM(11, 16, rnn, embedding_dim=8, dropout=0.5)
    tokens = torch.randint(0, 11, (3, cpu.MIN_STEPS))
    state = model.begin_state(3)
    model.eval()
    for compiled in (True, False):
        monkeypatch.setattr(cpu, "ENABLED", compiled)
        with torch.no_grad():
            first, second = model(tokens, state)[0], model(tokens, state)[0]
        assert torch.equal(first, second)
    model.train()
    outputs = []
    for compiled in (True, False):
        monkeypatch.setattr(cpu, "ENABLED", compiled)
        torch.manual_seed(5)
        outputs.append(model(tokens, state)[0].detach())
    torch.testing.assert_close(outputs[0], outputs[1])
    model.eval()
    assert not torch.allclose(outputs[0], model(tokens, state)[0])


def test_the_run_says_what_amp_means_for_its_model_here(monkeypatch):
    window = (2, cpu.MIN_STEPS)
    assert matmul_precision(RNNLM(5, 4, "lstm"), amp=False, window=window) == "float32"
    if not cpu.compiled():
        pytest.skip("no C compiler here: the compiled kernels are not built")
    monkeypatch.setenv("RNNLM_CPU_CHOICE", "lstm-step=compiled")  # as where the compiled LSTM is quicker
    assert matmul_precision(RNNLM(5, 4, "rnn"), True, window).startswith("float32")  # no bf16 kernel for it
    monkeypatch.setattr(native, "bf16_native", lambda: False)
    assert matmul_precision(RNNLM(5, 4, "lstm"), True, window).startswith("float32")  # bf16 would be slower here
    assert matmul_precision(RNNLM(5, 4, "lstm").double(), True, window).startswith("float32")  # torch's too
    monkeypatch.setattr(native, "bf16_native", lambda: True)
    assert matmul_precision(RNNLM(5, 4, "lstm"), True, window).startswith("bf16 recurrent matmuls")
    assert matmul_precision(RNNLM(5, 4, "lstm", num_layers=2), True, window).startswith("float32")  # two layers
    assert matmul_precision(RNNLM(5, 4, "lstm").double(), True, window).startswith("bf16 autocast")  # torch's


@pytest.mark.parametrize("rnn", ["rnn", "lstm"])
def test_under_cpu_autocast_only_the_lstm_takes_bf16_matmuls(monkeypatch, rnn):
    """`amp` on the CPU: the LSTM's compiled kernels switch to bf16 matmuls where they run at bf16 speed; the tanh
    RNN (and GRU) keep their float32 kernels, and the output layer stays float32 for all."""
    if not cpu.compiled():
        pytest.skip("no C compiler here: the compiled kernels are not built")
    monkeypatch.setattr(native, "bf16_native", lambda: True)  # as on an AVX512-BF16 CPU, whatever this one is
    calls = []

    def counted(name, run):
        return lambda *args: calls.append(name) or run(*args)

    for name in ("lstm_forward_bf16", "lstm_forward", "rnn_forward"):
        monkeypatch.setattr(native, name, counted(name, getattr(native, name)))
    torch.manual_seed(0)
    model = RNNLM(7, 8, rnn)
    tokens = torch.randint(0, 7, (2, cpu.MIN_STEPS))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, _ = model(tokens, model.begin_state(2))
    assert logits.dtype == torch.float32
    assert set(calls) == {"lstm_forward_bf16" if rnn == "lstm" else "rnn_forward"}


def _sharing(sharing: str, monkeypatch) -> tuple[bool, int, list[bool]]:
    """(`share`, torch threads, what `native.team` returned at each call) for a way of running a window's workers:
    on the helper thread, on this thread alone, or on torch's two OpenMP threads (the team; skipped where it cannot
    run here)."""
    ran: list[bool] = []
    if sharing != "openmp-team":
        return sharing == "helper-thread", 1 if sharing == "one-thread" else torch.get_num_threads(), ran
    if not _team_here():
        pytest.skip("no OpenMP team of two here (one core, or kernels without torch's OpenMP runtime)")
    real = native.team
    monkeypatch.setattr(native, "team", lambda windows: ran.append(real(windows)) or ran[-1])
    return False, 2, ran


# how a window's workers run, for each layer: the tanh RNN's windows split the batch rows, on the helper thread only
WAYS = [(rnn, sharing) for sharing in ("helper-thread", "one-thread", "openmp-team") for rnn in ("rnn", "gru", "lstm")]
WAYS.remove(("rnn", "openmp-team"))


@needs_build
@pytest.mark.parametrize("inputs", ["one-hot", "dense"])
@pytest.mark.parametrize("rnn, sharing", WAYS, ids=[f"{sharing}-{rnn}" for rnn, sharing in WAYS])
def test_compiled_kernels_give_torch_layers_outputs_and_gradients(rnn, sharing, inputs, monkeypatch):
    """The compiled windows, with the work shared with the helper thread, on one thread, or on torch's two OpenMP
    threads, give nn.RNN's / nn.GRU's / nn.LSTM's outputs and gradients, over one-hot inputs (their table picked by
    the tokens) and over dense ones (their products computed before the window). The batch (13 rows) and the hidden
    size (40) are not multiples of the kernels' blocks, so their edge code runs too."""
    share, torch_threads, team_ran = _sharing(sharing, monkeypatch)
    torch.manual_seed(1)
    steps, batch, vocab, hidden = 12, 13, 9, 40
    layer = {"rnn": torch.nn.RNN, "gru": torch.nn.GRU, "lstm": torch.nn.LSTM}[rnn](vocab, hidden)
    tokens = torch.randint(0, vocab, (steps, batch))
    x = torch.nn.functional.one_hot(tokens, vocab).float() if inputs == "one-hot" else torch.randn(steps, batch, vocab)
    initial = [torch.randn(batch, hidden) for _ in range(2 if rnn == "lstm" else 1)]  # h0 (and c0)
    weight = torch.randn(steps, batch, hidden)  # a loss that weighs every output differently
    cell_weight = torch.randn(batch, hidden)  # and the LSTM's last cell state

    reference = [s.clone().requires_grad_() for s in initial]
    state = tuple(s[None] for s in reference) if rnn == "lstm" else reference[0][None]
    outputs, final = layer(x, state)
    cell = final[1][0] if rnn == "lstm" else None
    _loss(outputs, cell, weight, cell_weight).backward()
    expected = [outputs.detach()] + [s.grad for s in reference] + [p.grad.clone() for p in layer.parameters()]

    layer.zero_grad()
    ours_initial = [s.clone().requires_grad_() for s in initial]
    w_ih, w_hh, b_ih, b_hh = layer.weight_ih_l0, layer.weight_hh_l0, layer.bias_ih_l0, layer.bias_hh_l0
    bias = b_ih if rnn == "gru" else b_ih + b_hh
    table = w_ih.T + bias if inputs == "one-hot" else x.reshape(-1, vocab) @ w_ih.T + bias
    picked = tokens if inputs == "one-hot" else None
    cell = None
    with threads.torch_threads(torch_threads):
        if rnn == "lstm":
            ours, cell = recurrence.LSTM.apply(table, picked, *ours_initial, w_hh, share)
        elif rnn == "gru":
            ours = recurrence.GRU.apply(table, picked, *ours_initial, w_hh, b_hh, share)
        else:
            ours = recurrence.TanhRNN.apply(table, picked, *ours_initial, w_hh, share)
        _loss(ours, cell, weight, cell_weight).backward()
    assert team_ran == ([True, True] if sharing == "openmp-team" else [])  # the forward window, then the backward
    got = [ours.detach()] + [s.grad for s in ours_initial] + [p.grad for p in layer.parameters()]
    names = ["outputs", "h0"] + (["c0"] if rnn == "lstm" else []) + ["weight_ih", "weight_hh", "bias_ih", "bias_hh"]
    for name, a, b in zip(names, got, expected, strict=True):
        torch.testing.assert_close(a, b, msg=name)


@needs_build
def test_the_compiled_lstms_backward_in_parts_gives_the_same_bits_on_one_worker_or_two(monkeypatch):
    """The LSTM's backward window sums each step's product in two parts, over the gate columns of each half of the
    units (kernels.c: lstm_backward), one worker's each on two workers or both on one: the gradients reaching the
    window's inputs and initial state must have the same bits on this thread alone, with the helper thread and on
    torch's OpenMP team, and every gradient must be nn.LSTM's. An odd hidden size (37: parts of 18 and 19 units) and
    a batch that is no multiple of the register blocks (13) run the edges."""
    torch.manual_seed(3)
    steps, batch, inputs, hidden = 9, 13, 6, 37
    layer = torch.nn.LSTM(inputs, hidden)
    x, h0, c0 = torch.randn(steps, batch, inputs), torch.randn(batch, hidden), torch.randn(batch, hidden)
    weight, cell_weight = torch.randn(steps, batch, hidden), torch.randn(batch, hidden)
    reference = [h0[None].requires_grad_(), c0[None].requires_grad_()]
    outputs, (_, cell) = layer(x, reference)
    _loss(outputs, cell[0], weight, cell_weight).backward()
    expected = [layer.weight_ih_l0.grad, layer.weight_hh_l0.grad, *(s.grad[0] for s in reference)]
    w_ih, w_hh = layer.weight_ih_l0.detach(), layer.weight_hh_l0.detach()
    bias = (layer.bias_ih_l0 + layer.bias_hh_l0).detach()

    def gradients(sharing: str) -> list[torch.Tensor]:
        share, torch_threads, _ = _sharing(sharing, monkeypatch)
        table, w = (x.reshape(-1, inputs) @ w_ih.T + bias).requires_grad_(), w_hh.clone().requires_grad_()
        initial = [h0.clone().requires_grad_(), c0.clone().requires_grad_()]
        with threads.torch_threads(torch_threads):
            hs, last = recurrence.LSTM.apply(table, None, *initial, w, share)
            _loss(hs, last, weight, cell_weight).backward()
        return [table.grad, w.grad, *(s.grad for s in initial)]

    one, helper = gradients("one-thread"), gradients("helper-thread")
    ways = [helper] + ([gradients("openmp-team")] if _team_here() else [])
    for got in ways:
        assert torch.equal(got[0], one[0]) and torch.equal(got[2], one[2]) and torch.equal(got[3], one[3])
        torch.testing.assert_close(got[1], one[1])  # W_hh's: with the helper thread, a sum of two halves of the rows
    torch.testing.assert_close(one[0].T @ x.reshape(-1, inputs), expected[0])  # W_ih's, from the table's
    for got, wanted in zip(one[1:], expected[1:], strict=True):
        torch.testing.assert_close(got, wanted)


def _team_here() -> bool:
    """Whether torch's two OpenMP threads can run a window's workers here (two cores, kernels on torch's runtime)."""
    with threads.torch_threads(2):
        return threads.team_free()


class _RoundedMatmul(torch.autograd.Function):
    """x @ w.T from inputs rounded to bf16, summed in float64; its backward's two products the same way: the
    arithmetic that the bf16 kernels promise, without their float32 sums."""

    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        return _bf16(x) @ _bf16(w).T

    @staticmethod
    def backward(ctx, grad):
        x, w = ctx.saved_tensors
        return _bf16(grad) @ _bf16(w), _bf16(grad).T @ _bf16(x)


def _bf16(t):
    return t.float().bfloat16().double()


def _lstm_with_bf16_matmuls(tokens, h, c, w_ih, w_hh, b_ih, b_hh, w_out, b_out):
    """nn.LSTM's equations in float64 over one-hot inputs, the recurrent matmul's inputs rounded to bf16, and the
    output layer: (logits (steps * batch, vocab), h and c of the last step)."""
    outputs = []
    for step in tokens:
        i, f, g, o = (w_ih.T[step] + b_ih + b_hh + _RoundedMatmul.apply(h, w_hh)).chunk(4, 1)
        c = f.sigmoid() * c + i.sigmoid() * g.tanh()
        h = o.sigmoid() * c.tanh()
        outputs.append(h)
    return torch.cat(outputs) @ w_out.T + b_out, h, c


@pytest.mark.parametrize("share", [True, False], ids=["two-threads", "one-thread"])
def test_compiled_bf16_lstm_rounds_only_the_matmul_inputs(monkeypatch, share):
    """The LSTM's bf16 kernels with the output layer (`amp` on the CPU) round the recurrent matmuls' inputs to bf16
    and sum in float32, everything else float32: logits, last state and every gradient agree with float64 arithmetic
    that rounds the same inputs (to 1.5e-4 of the largest value; they are 1e-3 to 1e-2 away from nn.LSTM's float32
    results, and zeroing a single gate gradient per row at one step puts them 2e-4 to 2e-3 away). Odd batch, hidden
    and vocabulary sizes run the edge code, an odd number of steps * batch rows leaves W_hh's gradient a half pair;
    the two-thread case splits the batch."""
    if not native.library():
        pytest.skip("no C compiler here: the compiled kernels are not built")
    torch.manual_seed(3)
    steps, batch, vocab, hidden = 11, 13, 9, 41
    layer, output = torch.nn.LSTM(vocab, hidden), torch.nn.Linear(hidden, vocab)
    params = (layer.weight_ih_l0, layer.weight_hh_l0, layer.bias_ih_l0, layer.bias_hh_l0, output.weight, output.bias)
    tokens = torch.randint(0, vocab, (steps, batch))
    initial = [torch.randn(batch, hidden) for _ in range(2)]
    weights = [torch.randn(steps * batch, vocab), torch.randn(batch, hidden), torch.randn(batch, hidden)]

    exact_params = [p.detach().double().requires_grad_() for p in params]
    exact_state = [s.double().requires_grad_() for s in initial]
    results = _lstm_with_bf16_matmuls(tokens, *exact_state, *exact_params)
    sum((r * w).sum() for r, w in zip(results, weights, strict=True)).backward()
    expected = [r.detach() for r in results] + [s.grad for s in exact_state] + [p.grad for p in exact_params]

    buffer = native.pair_panels  # NaNs where the kernels must write: a word they skip shows up in the gradients
    monkeypatch.setattr(native, "pair_panels", lambda *shape: buffer(*shape).fill_(float("nan")))
    state = [s.clone().requires_grad_() for s in initial]
    results = recurrence.OneHotLSTMLogits.apply(tokens, *state, *params, share)
    sum((r * w).sum() for r, w in zip(results, weights, strict=True)).backward()
    got = [r.detach() for r in results] + [s.grad for s in state] + [p.grad for p in params]
    names = ["logits", "h", "c", "h0", "c0", "weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_out", "bias_out"]
    for name, ours, exact in zip(names, got, expected, strict=True):
        error = float((ours.double() - exact).abs().max() / exact.abs().max())
        assert error < 1.5e-4, (name, error)


def test_compiled_bf16_lstm_outputs_are_freed_without_the_garbage_collector():
    """The bf16 window keeps its buffers on the autograd node for the backward, but not the logits it returns: an
    output held by its own node is a reference cycle, and each minibatch's buffers would wait for the collector."""
    if not native.library():
        pytest.skip("no C compiler here: the compiled kernels are not built")
    layer, output = torch.nn.LSTM(9, 16), torch.nn.Linear(16, 9)
    params = (layer.weight_ih_l0, layer.weight_hh_l0, layer.bias_ih_l0, layer.bias_hh_l0, output.weight, output.bias)
    tokens, state = torch.randint(0, 9, (10, 4)), (torch.zeros(4, 16), torch.zeros(4, 16))
    gc.disable()
    try:
        logits, h, c = recurrence.OneHotLSTMLogits.apply(tokens, *state, *params, False)
        logits.sum().backward()
        freed = weakref.ref(logits)
        del logits, h, c
        assert freed() is None
    finally:
        gc.enable()


def _loss(outputs, cell, weight, cell_weight):
    return (outputs * weight).sum() + (0 if cell is None else (cell * cell_weight).sum())


def test_output_layer_gives_nn_linears_outputs_and_gradients():
    if not recurrence.ONEDNN:
        pytest.skip("this torch build has no oneDNN linear ops")
    torch.manual_seed(2)
    layer = torch.nn.Linear(16, 9)
    x = torch.randn(40, 16)
    weight = torch.randn(40, 9)  # a loss that weighs every logit differently
    results = []
    for run in (layer, lambda x: recurrence.Linear.apply(x, layer.weight, layer.bias)):
        layer.zero_grad()
        inputs = x.clone().requires_grad_()
        out = run(inputs)
        (out * weight).sum().backward()
        results.append([out.detach(), inputs.grad, layer.weight.grad.clone(), layer.bias.grad.clone()])
    for name, ours, expected in zip(["logits", "x", "weight", "bias"], results[1], results[0], strict=True):
        torch.testing.assert_close(ours, expected, msg=name)
