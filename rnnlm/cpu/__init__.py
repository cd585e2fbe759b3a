"""The CPU engine: the book's RNN, GRU and LSTM, at any depth and with embeddings, in compiled C (kernels.c), on
two cores.

The model hands a training window here in one call (`forward`, or `loss` with the output layer and cross-entropy
fused) when `handles` says the engine serves it, and the trainer asks for a whole SGD step without autograd
(`sgd_step`, for one-layer one-hot models); everything else runs on torch's layers, the one fallback. Each entry
checks what it is given before any C call (`checks`: the errors torch's layers raise). `handles` is a pure check;
the one measurement it depends on (which path trains an LSTM quicker here) runs in `prepare`, when a run hands the
model over (`settings`, which the trainer and evaluation enter). The engine imports nothing from the rest of the
library: it reads a model through its torch modules (`model.rnn`, `model.linear` or `model.adaptive`,
`model.embedding`, `model.drop`), the functions that draw its regularisers' masks (`first_inputs`,
`recurrent_weights`, `dropped`, `between_layers`, `word_scales`: the engine applies them as torch's path does; they
draw their masks with `bernoulli_` here, torch's own bits drawn in C) and `model.forward_torch`, its own path,
keeps its builds in its own cache folder (`native.cache()`), and describes itself for a run's records
(`device_name`, `engine_name`, `matmul_precision`).

    checks.py      what every entry checks before any C call, and the engine's own RNNLM_* variables
    native.py      builds kernels.c with the machine's compiler at first use; ctypes wrappers of its functions
    recurrence.py  the compiled windows as autograd functions, and the matmuls around them
    fused.py       whole SGD steps without autograd; the output layer with its loss in one C call per core
    choice.py      which of two ways is quicker on this machine, measured once and remembered
    threads.py     the helper thread on the second core, or torch's own OpenMP threads, and how a window is shared
    allocator.py   glibc kept from handing the trainer's freed memory back to the OS every minibatch
"""

from __future__ import annotations

import functools
import math
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from rnnlm.cpu import checks, choice, fused, native, recurrence
from rnnlm.cpu.allocator import keep_freed_memory
from rnnlm.cpu.threads import second_core_free, torch_threads, usable_cores

# Shortest window for the kernels: packing the weights costs more than a few steps, so generation's one-step calls
# stay on torch's layers.
MIN_STEPS = 8
# Fewest rows for which the output layer goes through oneDNN (torch's call is quicker for generation's few rows).
OUTPUT_MIN_ROWS = 128

_NOT_MEASURED = "the LSTM's path is not measured yet at this size (rnnlm.cpu.prepare measures it)"

ENABLED = True  # tests turn the engine off to check the fallback


class _Outermost(threading.local):
    threads: int | None = None  # torch's thread setting as this thread's outermost `settings` block found it


_outermost = _Outermost()


def default_threads() -> int:
    """torch's own thread setting, which auto threads (`threads_for`) give torch's layers: as this thread's
    outermost `settings` block found it, inside one (the block changes it, and an evaluation's block may sit inside a
    training's), and torch's current setting elsewhere: a library user's `torch.set_num_threads` holds."""
    return _outermost.threads or torch.get_num_threads()


def compiled() -> bool:
    """Whether the compiled kernels serve here (built with this machine's compiler, not turned off)."""
    return ENABLED and native.library() is not None


def bf16_fast() -> bool:
    """Whether the kernels' bf16 matmuls run at bf16 speed here (AVX512-BF16); elsewhere they are emulated, slower
    than float32, so `amp` keeps the float32 kernels."""
    return compiled() and native.bf16_native()


def handles(model: nn.Module, tokens: torch.Tensor) -> bool:
    """Whether `forward` and `loss` serve this call: tanh RNN, GRU or LSTM layers in float32 on the CPU, (batch,
    steps) tokens of at least MIN_STEPS steps, the kernels built here, and for the LSTM, the compiled one measured
    quicker here than torch's own (oneDNN's fused kernel) at this size. Pure and cheap: it reads the LSTM's choice
    (`prepare` makes it), never measures."""
    return why_not(model, tokens) is None


def why_not(model: nn.Module, tokens: torch.Tensor) -> str | None:
    """Why the engine does not serve this call, in words; None when it does."""
    if (reason := _unsupported(model, tokens)) is not None:
        return reason
    if tokens.shape[1] < MIN_STEPS:
        return f"windows of fewer than {MIN_STEPS} steps run quicker on torch's layers"
    if isinstance(model.rnn, nn.LSTM) and (path := lstm_path(model, tokens.shape[0])) != "compiled":
        if path is None:
            return _NOT_MEASURED
        how = _lstm_decision(model, tokens.shape[0])
        if how == "set by RNNLM_CPU_CHOICE":
            return "torch's LSTM, set by RNNLM_CPU_CHOICE=lstm-step=torch"
        return "torch's LSTM measured quicker than the compiled one on this machine" + (f" ({how})" if how else "")
    return None


def _unsupported(model: nn.Module, tokens: torch.Tensor) -> str | None:
    """Why the kernels cannot compute this call at all, in words; None when they can."""
    rnn = model.rnn
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2:
        return "the kernels take (batch, steps) token tensors"
    if tokens.device.type != "cpu" or rnn.weight_hh_l0.device.type != "cpu":
        return "not on the CPU"
    if not compiled():
        return "the compiled kernels are turned off" if not ENABLED else native.unavailable[0]
    if not (isinstance(rnn, nn.RNN | nn.GRU | nn.LSTM) and getattr(rnn, "nonlinearity", "tanh") == "tanh"):
        return f"the kernels take tanh RNN, GRU and LSTM layers, not {type(rnn).__name__}"
    if rnn.bidirectional or not rnn.bias or getattr(rnn, "proj_size", 0):
        return "the kernels take one direction, with biases, without projections"
    if rnn.weight_hh_l0.dtype != torch.float32:
        return f"the kernels take float32, not {rnn.weight_hh_l0.dtype}"
    return None


def prepare(model: nn.Module, window: tuple[int, int], amp: bool = False) -> None:
    """Make the engine's one measured decision for training `model` on (batch, steps) windows, before it is needed:
    for an LSTM it can serve, which path trains it quicker here (`_measure_lstm_path`: once per machine and size,
    remembered in choices.json; set by hand with RNNLM_CPU_CHOICE). Under `amp` where bf16 is quick, also which is
    quicker in bf16 (`autocast`), the precision the forward pass trains in. `settings` calls it when a run hands the
    model to the engine; after the first call it is a lookup."""
    check_environment()
    tokens = torch.zeros(window, dtype=torch.int64)
    if isinstance(model.rnn, nn.LSTM) and _unsupported(model, tokens) is None and window[1] >= MIN_STEPS:
        for bf16 in (False, True) if amp else (False,):
            with autocast(bf16):
                if lstm_path(model, window[0]) is None:
                    _measure_lstm_path(model, window[0])


def autocast(amp: bool):
    """CPU autocast to bf16 where `amp` asks for it and bf16 is quick here, as the trainer's forward pass runs (off
    otherwise): the LSTM's path is looked up, measured and described for the precision that trains."""
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp and bf16_fast())


def check_environment() -> None:
    """checks.EngineSettingError, naming the variable and the values it takes, where RNNLM_NATIVE or
    RNNLM_CPU_CHOICE holds a value the engine does not take."""
    checks.native_setting()
    choice.forced()


def lstm_path(model: nn.Module, batch: int) -> str | None:
    """'compiled' or 'torch': which way trains this LSTM model quicker here at this batch size, as `prepare`
    measured it (or an earlier process, or RNNLM_CPU_CHOICE set it); None before it did."""
    return choice.made(_lstm_choice(model, batch), per_threads=False)


def _measure_lstm_path(model: nn.Module, batch: int) -> str:
    """`lstm_path`, measured where no choice is recorded: each way as it runs (the engine on the torch threads
    `_engine_threads` gives, one with the helper thread; torch's layers on all of torch's threads), on a forked
    generator."""
    keep_freed_memory()  # as in training: freed pages kept for the next minibatch
    float32_recurrence = _autocast_on() and not _bf16_lstm(model)  # the compiled one, against torch's in bf16
    handicap = {"compiled": AMP_HANDICAP} if float32_recurrence else None
    return choice.fastest(
        _lstm_choice(model, batch), lambda: _lstm_candidates(model, batch), per_threads=False, handicap=handicap
    )


# Under amp the compiled LSTM (a float32 recurrence) is taken only where it measures this much quicker than torch's
# (bf16, half the bytes): a 2x512 LSTM on one core of a 2-core Xeon measured alike alone (260 against 274 ms a
# minibatch) but the compiled one 1.5x slower beside another training on the second core (docs/benchmarks.md).
AMP_HANDICAP = 1.1


def _lstm_choice(model: nn.Module, batch: int) -> str:
    """The name of `lstm_path`'s choice for this model's sizes and batch, and under CPU autocast (amp) its own: there
    torch's LSTM runs in bf16 (oneDNN, on AMX where the CPU has it) against the compiled one's float32 recurrence, or
    for the one-layer one-hot LSTM against the engine's own bf16 step (AVX512-BF16 dot products: 1.8x slower than
    its float32 step on a 2-core Xeon with AMX, where torch's bf16 LSTM was the quickest of the three, and 1.7x
    quicker on a Zen 4; docs/benchmarks.md)."""
    rnn, embedding = model.rnn, getattr(model, "embedding", None)
    sizes = (rnn.input_size, rnn.hidden_size, rnn.num_layers, *_output_sizes(model), embedding is not None, batch)
    threads = f"@{_engine_threads(model)}threads" if getattr(model, "adaptive", None) is not None else ""
    bf16 = "@bf16" if _autocast_on() else ""
    return "lstm-step:" + "x".join(map(str, sizes)) + threads + bf16  # the engine's threads: timed as it trains


def _lstm_decision(model: nn.Module, batch: int) -> str | None:
    """How this process took `lstm_path`'s choice, e.g. 'measured: compiled 15.60 ms against torch 17.30 ms' or
    'measured before on this machine'; None before it did."""
    decision = choice.decisions.get(_lstm_choice(model, batch))
    return decision.split(" (", 1)[1].removesuffix(")") if decision and " (" in decision else None


def _output_sizes(model: nn.Module) -> tuple[int, ...]:
    """The output layer's size: the vocabulary's for a linear layer, an adaptive softmax's cutoffs and vocabulary."""
    linear = getattr(model, "linear", None)
    return (linear.out_features,) if linear is not None else tuple(model.adaptive.cutoffs)


def _lstm_candidates(model: nn.Module, batch: int) -> dict:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        bf16 = _autocast_on()  # each candidate times itself under autocast (`choice` times with it off)
        return fused.lstm_candidates(model, batch, 35, default_threads(), loss, _engine_threads(model), bf16)


def bernoulli_(out: torch.Tensor, p: float, value: float = 1.0) -> torch.Tensor:
    """`out.bernoulli_(p)` from torch's default generator, `value` (a float32 number) in place of each 1: the same
    bits, the generator left where torch's call leaves it; drawn by the kernels (about 10x quicker) for a contiguous
    float32 CPU tensor where they are built."""
    if compiled() and out.device.type == "cpu" and out.dtype == torch.float32 and out.is_contiguous():
        return native.bernoulli_(out, p, value)
    return native.torch_bernoulli_(out, p, value)


def keep_mask(out: torch.Tensor, keep: float) -> torch.Tensor:
    """`out` filled with dropout's scaled mask: 1 / keep with probability `keep`, else 0, the bits of torch's way
    (`bernoulli_`, then divided by keep), the scaled value drawn at once."""
    if keep <= 0:  # nothing kept: torch's 0 / 0
        return bernoulli_(out, keep).div_(keep)
    return bernoulli_(out, keep, _reciprocal(keep))


@functools.cache
def _reciprocal(keep: float) -> float:
    """1 / keep as torch divides a float32 1 by it (a float32 number)."""
    return torch.ones(()).div_(keep).item()


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """`F.dropout(x, p, training)` with the mask from `keep_mask`: torch's own steps on the CPU (a mask of 1 - p,
    divided by 1 - p, times x), so the same output and gradient from the same generator; torch's call elsewhere
    (another device keeps torch's fused dropout)."""
    if not (training and 0 < p < 1 and x.device.type == "cpu" and x.is_contiguous() and x.numel()):
        return torch.nn.functional.dropout(x, p, training)
    return x * keep_mask(torch.empty_like(x), 1 - p)


def total_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The global 2-norm of `tensors` (a step's gradients), as `torch.nn.utils.get_total_norm` gives it (0-d float32):
    for contiguous float32 CPU tensors summed by the kernels in double on torch's threads (torch's norm of each runs
    on one thread and sums in float32, 5e-5 off over 2.5 million elements); torch's call elsewhere."""
    if compiled() and all(t.is_cpu and t.dtype == torch.float32 and t.is_contiguous() for t in tensors):
        return torch.tensor(math.sqrt(native.sum_squares(tensors, torch.get_num_threads())), dtype=torch.float32)
    return torch.nn.utils.get_total_norm(tensors, foreach=True)


def linear_loss(hs: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The summed cross-entropy of `targets` (rows,) under the linear layer (weight, bias) over hs (rows, H), as
    `F.cross_entropy(F.linear(hs, weight, bias), targets, reduction="sum")`: in float32 on a CPU where the kernels
    are built, the loss and its gradients in one pass over the logits in C (`fused.OutputLoss`, in place of torch's
    log-softmax, gather, their backward and their copies); torch's ops elsewhere, and under autocast."""
    quick = compiled() and hs.device.type == "cpu" and not _autocast_on()
    if not (quick and all(t.dtype == torch.float32 for t in (hs, weight, bias)) and hs.dim() == 2):
        return nn.functional.cross_entropy(nn.functional.linear(hs, weight, bias).float(), targets, reduction="sum")
    if torch.is_grad_enabled() and any(t.requires_grad for t in (hs, weight, bias)):
        return fused.OutputLoss.apply(hs, weight, bias, targets)
    return fused.summed_loss(fused.layer_of(weight, bias), hs, targets)


def forward(model: nn.Module, tokens: torch.Tensor, state):
    """The model's forward on the kernels: tokens (batch, steps) -> logits (steps * batch, vocab), time-major, and
    the last state, as torch's layers would give them (and their errors for bad input, before any C call)."""
    tokens, state, _, _ = _checked(model, tokens, state)
    return _forward(model, tokens, state)


def _checked(model: nn.Module, tokens, state, targets=None):
    """An entry's inputs checked (`checks.window`: tokens, state, targets as int64 or None, whether one is ignored),
    and the model one the kernels can compute (ValueError else)."""
    checked = checks.window(model, tokens, state, targets)
    if (reason := _unsupported(model, checked[0])) is not None:
        raise ValueError(f"the CPU engine cannot take this call: {reason}")
    return checked


def _forward(model: nn.Module, tokens: torch.Tensor, state):
    """`forward` of checked inputs."""
    bf16 = _bf16_lstm(model) and _autocast_on()
    with torch.autocast("cpu", enabled=False):  # the kernels set their own precision
        if bf16:
            return _lstm_bf16(model, tokens, state)
        outputs, state = _layers(model, tokens.T, state)
        outputs = _dropped_rows(model, outputs)  # (steps * batch, H)
        if model.linear is None:  # an adaptive softmax: log-probabilities
            return model.adaptive(outputs), state
        return _output(model.linear, outputs), state


def loss(model: nn.Module, tokens: torch.Tensor, targets: torch.Tensor, state, reduction: str = "mean"):
    """The mean (or summed) cross-entropy of `targets` on the kernels, tokens and targets (batch, steps), and the
    last state: the output layer, the loss and their gradients in one C call per core, without keeping the logits.
    Targets of torch's ignore_index (-100) are skipped as cross_entropy skips them, on the logits."""
    tokens, state, targets, ignored = _checked(model, tokens, state, targets)
    if (_bf16_lstm(model) and _autocast_on()) or (ignored and model.linear is not None):
        logits, state = _forward(model, tokens, state)
        return torch.nn.functional.cross_entropy(logits, targets.T.reshape(-1), reduction=reduction), state
    bf16 = model.linear is None and _autocast_on() and bf16_fast()  # amp: an adaptive softmax's matmuls in bf16
    with torch.autocast("cpu", enabled=False):
        outputs, state = _layers(model, tokens.T, state)
        outputs, out, flat = _dropped_rows(model, outputs), model.linear, targets.T.reshape(-1)
        if out is None:  # an adaptive softmax: its head and each target's cluster, on torch's matmuls
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                total = model.adaptive.loss(outputs, flat, "sum")
        elif torch.is_grad_enabled():
            total = fused.OutputLoss.apply(outputs, out.weight, out.bias, flat)
        else:  # evaluation: the loss only
            total = fused.summed_loss(out, outputs, flat)
    return (total if reduction == "sum" else total / targets.numel()), state


def recurrent(model: nn.Module, tokens: torch.Tensor, state):
    """The model's `recurrent` on the kernels: tokens (batch, steps) -> the last layer's outputs before the output
    dropout (steps, batch, H) and the last state, as torch's layers give them (for AWD-LSTM's activation penalties)."""
    tokens, state, _, _ = _checked(model, tokens, state)
    with torch.autocast("cpu", enabled=False):
        return _layers(model, tokens.T, state)


def _layers(model: nn.Module, tokens: torch.Tensor, state):
    """The model's layers over a window, tokens (steps, batch): (the last layer's outputs before the output dropout,
    (steps, batch, H); the last state). The first layer's input is a lookup: rows of W_ih.T + biases for the book's
    one-hot input (scaled by embedding dropout's `model.word_scales()`), or the model's own (`model.first_inputs`: the
    embedding's rows, dropped out); each layer above takes the one below through `model.between_layers` (dropout's
    mask, or locked dropout's). W_hh is the model's `recurrent_weights()` (with weight drop's mask), so that a
    regularised model draws its masks with the functions, and in the order, of its path on torch's layers."""
    rnn, share = model.rnn, second_core_free()
    if model.embedding is None:
        inputs, scales = None, model.word_scales()
    else:
        inputs, scales = model.first_inputs(tokens), None
    weights = model.recurrent_weights()
    lstm, last = isinstance(rnn, nn.LSTM), []
    for layer, layer_weights in enumerate(weights):
        inputs = model.between_layers(inputs) if layer else inputs
        layer_state = (state[0][layer], state[1][layer]) if lstm else state[layer]
        inputs, layer_last = _layer(rnn, layer_weights, tokens, inputs, layer_state, share, None if layer else scales)
        last.append(layer_last)
    if lstm:
        return inputs, (torch.stack([h for h, _ in last]), torch.stack([c for _, c in last]))
    return inputs, torch.stack(last)


def _dropped_rows(model: nn.Module, outputs: torch.Tensor) -> torch.Tensor:
    """The last layer's outputs (steps, batch, H) after the model's output dropout, as rows (steps * batch, H)."""
    return model.dropped(outputs).reshape(-1, outputs.shape[-1])


def _layer(rnn: nn.Module, weights: list, tokens, inputs: torch.Tensor | None, state, share: bool, scales=None):
    """One layer over the window with its [W_ih, W_hh, b_ih, b_hh]: (its outputs (steps, batch, H), its last
    state). `inputs` (steps, batch, in) is None for the book's one-hot input: the tokens pick rows of W_ih.T (each
    word's row times its scale under embedding dropout) + biases."""
    w_ih, w_hh, b_ih, b_hh = weights
    picked = tokens if inputs is None else None

    def table(bias: torch.Tensor) -> torch.Tensor:  # the input products: a row per token (one-hot) or per input row
        if inputs is None:
            return (w_ih.T if scales is None else w_ih.T * scales[:, None]) + bias
        return recurrence.Linear.apply(inputs.reshape(-1, inputs.shape[-1]), w_ih, bias)

    if isinstance(rnn, nn.LSTM):
        hs, c_last = recurrence.LSTM.apply(table(b_ih + b_hh), picked, state[0], state[1], w_hh, share)
        return hs, (hs[-1], c_last)
    if isinstance(rnn, nn.GRU):
        hs = recurrence.GRU.apply(table(b_ih), picked, state, w_hh, b_hh, share)
    else:
        hs = recurrence.TanhRNN.apply(table(b_ih + b_hh), picked, state, w_hh, share)
    return hs, hs[-1]


def _output(linear: nn.Linear, outputs: torch.Tensor) -> torch.Tensor:
    """The output layer, (rows, H) -> (rows, vocab): oneDNN's or torch's matmuls, whichever is quicker here, for a
    training window's rows."""
    if recurrence.ONEDNN and outputs.shape[0] >= OUTPUT_MIN_ROWS:
        return recurrence.Linear.apply(outputs, linear.weight, linear.bias)
    return linear(outputs)


def _bf16_lstm(model: nn.Module) -> bool:
    """Whether the engine, where it serves this model under `amp` (its bf16 step measured quicker than torch's bf16
    LSTM: `lstm_path`), runs its LSTM in bf16 here: one layer over one-hot inputs, without dropout, on a CPU with
    AVX512-BF16."""
    return isinstance(model.rnn, nn.LSTM) and model.rnn.num_layers == 1 and _one_hot(model) and bf16_fast()


def _one_hot(model: nn.Module) -> bool:
    """Whether the model is the book's kind: one-hot inputs, no dropout, a linear output layer, and in training no
    regulariser (the compiled whole steps and bf16 windows apply none)."""
    plain = getattr(model, "embedding", None) is None and getattr(model, "linear", None) is not None
    regularised = model.training and getattr(model, "regularisers", ())
    return plain and not getattr(getattr(model, "drop", None), "p", 0.0) and not regularised


def _lstm_bf16(model: nn.Module, tokens: torch.Tensor, state):
    """The LSTM under CPU autocast where bf16 is quick: bf16 recurrent matmuls summed in float32, and the output
    layer, in the same compiled windows."""
    rnn, linear, (h0, c0) = model.rnn, model.linear, state
    weights = (rnn.weight_ih_l0, rnn.weight_hh_l0, rnn.bias_ih_l0, rnn.bias_hh_l0, linear.weight, linear.bias)
    logits, h_last, c_last = recurrence.OneHotLSTMLogits.apply(tokens.T, h0[0], c0[0], *weights, second_core_free())
    return logits, (h_last[None], c_last[None])


def sgd_step(model, optimizer, tokens, targets, state, grad_clip: float, amp: bool):
    """One whole training step without autograd where it applies (one layer over the book's one-hot input, no
    dropout, served by the engine, plain SGD): returns (the mean loss, a 0-d tensor; the last state), else None and
    the caller takes the autograd step (also for parameters that are views: the fused steps update them in place).
    The fused steps check the inputs (`fused.checked_step`). Under `amp` where bf16 is quick, the LSTM's step is all
    compiled (bf16 matmuls); otherwise float32."""
    if not (_one_hot(model) and model.rnn.num_layers == 1):
        return None
    with autocast(amp):  # the LSTM's path as amp trains (`lstm_path` under autocast)
        if not handles(model, tokens):
            return None
    params = list(model.parameters())
    if not (fused.plain_sgd(optimizer, params) and all(p.is_contiguous() for p in params)):
        return None
    lr = float(optimizer.param_groups[0]["lr"])
    if amp and _bf16_lstm(model):
        return fused.sgd_step(model, tokens, targets, state, lr, grad_clip)
    return fused.float32_step(model, tokens, targets, state, lr, grad_clip)


def threads_for(cpu_threads: int, model: nn.Module, window: tuple[int, int], amp: bool = False) -> int:
    """The torch threads a CPU run of `model` on (batch, steps) windows takes: `cpu_threads`, or for 0 (auto) one
    when the engine serves the model (under `amp` as its forward pass runs: `autocast`; its helper thread takes the
    second core) and torch's own setting else. A model with an adaptive softmax takes torch's own setting too: its
    head and clusters run on torch's matmuls, most of the step, which a second torch thread speeds up more than the
    helper thread speeds up the recurrence (kjv-best.toml: 1.43x the tokens/s on a 2-core Xeon, docs/benchmarks.md);
    its recurrence's windows then run on torch's two OpenMP threads (`threads.team_free`)."""
    if cpu_threads > 0:
        return cpu_threads
    with autocast(amp):
        served = handles(model, torch.zeros(window, dtype=torch.int64))
    return _engine_threads(model) if served else default_threads()


def _engine_threads(model: nn.Module) -> int:
    """The torch threads the engine trains `model` on by default: one (and the helper thread), or torch's own
    setting for a model with an adaptive softmax (see `threads_for`)."""
    return 1 if getattr(model, "adaptive", None) is None else default_threads()


@contextmanager
def settings(cpu_threads: int, model: nn.Module, window: tuple[int, int], amp: bool = False) -> Iterator[None]:
    """The block runs on the CPU with the engine prepared for `model` on (batch, steps) windows (`prepare`: the
    moment a run hands the model over, where the LSTM's path is measured once), with the torch threads `threads_for`
    gives (for the path that trains, under `amp` too) and freed memory kept for the next minibatch; elsewhere it runs
    as it is."""
    if next(model.parameters()).device.type != "cpu":
        yield
        return
    outermost = _outermost.threads is None
    if outermost:
        _outermost.threads = torch.get_num_threads()
    try:
        prepare(model, window, amp)
        keep_freed_memory()  # minibatches reuse the same pages instead of faulting in fresh ones
        with torch_threads(threads_for(cpu_threads, model, window, amp)):
            yield
    finally:
        if outermost:
            _outermost.threads = None


def device_name(model: nn.Module, cpu_threads: int, window: tuple[int, int], amp: bool = False) -> str:
    """Where `model` trains, in words, e.g. 'cuda:0 (NVIDIA H200)', 'cpu (2 threads)', or with one torch thread on a
    machine of several cores 'cpu (1 thread + the recurrence's helper thread)'; `cpu_threads` 0 is auto (see
    `threads_for`, for the path that trains under `amp` too), for (batch, steps) training windows."""
    device = next(model.parameters()).device
    if device.type == "cuda":
        return f"cuda:{device.index or 0} ({torch.cuda.get_device_name(device)})"
    if device.type != "cpu":
        return str(device)
    threads = threads_for(cpu_threads, model, window, amp)
    helper = " + the recurrence's helper thread" if threads == 1 and usable_cores() > 1 else ""
    return f"cpu ({threads} thread{'s' if threads > 1 else ''}{helper})"


def engine_name(model: nn.Module, window: tuple[int, int], amp: bool = False) -> str:
    """Which code trains `model` on (batch, steps) windows here (under `amp`: as its forward pass runs, `autocast`),
    and why, in words, for the run's records: the CPU engine, or torch's layers (with the reason), or cuDNN's on a
    GPU."""
    device = next(model.parameters()).device
    if device.type == "cuda":
        return "torch's layers (cuDNN)"
    if device.type != "cpu":
        return f"torch's layers ({device.type})"
    with autocast(amp):
        return _engine_words(model, window)


def _engine_words(model: nn.Module, window: tuple[int, int]) -> str:
    reason = why_not(model, torch.zeros(window, dtype=torch.int64))
    lstm = isinstance(model.rnn, nn.LSTM)
    if reason == _NOT_MEASURED:
        return f"compiled kernels ({native.instruction_set()}) or torch's LSTM, whichever measures quicker at the start"
    if reason is not None:
        return f"torch's layers ({reason})"
    how = _lstm_decision(model, window[0]) if lstm else None
    cores = "two cores" if usable_cores() > 1 else "one core"
    return f"compiled kernels ({native.instruction_set()}), {cores}" + (f"; over torch's LSTM ({how})" if how else "")


def matmul_precision(model: nn.Module, amp: bool, window: tuple[int, int]) -> str:
    """What `amp` means for `model`'s training matmuls on (batch, steps) windows where it is, in words."""
    if next(model.parameters()).device.type != "cpu":
        return "bf16 autocast (forward pass)" if amp else "float32"
    if not amp:
        return "float32"
    if not bf16_fast():
        return "float32 (no AVX512-BF16 for the compiled kernels here: bf16 would be slower than float32)"
    with autocast(amp):
        served = handles(model, torch.zeros(window, dtype=torch.int64))
    if not served:
        return "bf16 autocast (forward pass, torch's CPU layers)"
    if _bf16_lstm(model):
        return "bf16 recurrent matmuls (AVX512-BF16), float32 elsewhere"
    if model.linear is None:
        return "bf16 adaptive softmax (AVX512-BF16), float32 recurrence"
    return "float32 (amp's bf16 kernels serve the one-layer one-hot LSTM on CPUs with AVX512-BF16)"


def _autocast_on() -> bool:
    """Whether CPU autocast is on (torch >= 2.4 takes a device type; 2.3, which the project accepts, does not)."""
    try:
        return torch.is_autocast_enabled("cpu")
    except TypeError:
        return torch.is_autocast_cpu_enabled()
