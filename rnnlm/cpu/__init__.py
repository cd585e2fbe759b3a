"""The CPU engine: the book's one-layer RNN, GRU and LSTM in compiled C (kernels.c), on two cores.

The model hands a training window here in one call (`forward`) when `handles` says the engine serves it, and the
trainer asks for a whole compiled SGD step (`sgd_step`, the bf16 LSTM); everything else runs on torch's layers, the
one fallback. The engine imports nothing from the rest of the library: it reads a model through its torch layers
(`model.rnn`, `model.linear`) only.

    native.py      builds kernels.c with the machine's compiler at first use; ctypes wrappers of its functions
    recurrence.py  the compiled windows as autograd functions
    fused.py       the bf16 LSTM's whole SGD step in C
    threads.py     the helper thread on the second core and how a window is shared with it
    allocator.py   glibc kept from handing the trainer's freed memory back to the OS every minibatch
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from rnnlm.cpu import choice, fused, native, recurrence
from rnnlm.cpu.allocator import keep_freed_memory
from rnnlm.cpu.threads import second_core_free, torch_threads

# Shortest window for the kernels: one step costs 213 us (RNN) / 252 us (GRU) through them, mostly weight packing,
# against 35 / 52 us through torch's layers; generation's one-step calls stay on torch's layers.
MIN_STEPS = 8
# Fewest rows for which the output layer goes through oneDNN (torch's call is quicker for generation's few rows).
OUTPUT_MIN_ROWS = 128

ENABLED = True  # tests turn the engine off to check the fallback
DEFAULT_THREADS = torch.get_num_threads()  # torch's own setting, before any run changes it


def compiled() -> bool:
    """Whether the compiled kernels serve here (built with this machine's compiler, not turned off)."""
    return ENABLED and native.library() is not None


def bf16_fast() -> bool:
    """Whether the kernels' bf16 matmuls run at bf16 speed here (AVX512-BF16); elsewhere they are emulated, slower
    than float32, so `amp` keeps the float32 kernels."""
    return compiled() and native.bf16_native()


def handles(model: nn.Module, tokens: torch.Tensor) -> bool:
    """Whether `forward` serves this call: one-layer tanh RNN, GRU or LSTM in float32 on the CPU, a window of at
    least MIN_STEPS steps, the kernels built here, and for the LSTM, the compiled step measured quicker here than
    torch's own LSTM (oneDNN's fused kernel) at this batch size."""
    return why_not(model, tokens) is None


def why_not(model: nn.Module, tokens: torch.Tensor) -> str | None:
    """Why the engine does not serve this call, in words; None when it does."""
    rnn = model.rnn
    if tokens.device.type != "cpu" or rnn.weight_hh_l0.device.type != "cpu":
        return "not on the CPU"
    if not compiled():
        return "the compiled kernels are turned off" if not ENABLED else native.unavailable[0]
    if not (isinstance(rnn, nn.RNN | nn.GRU | nn.LSTM) and getattr(rnn, "nonlinearity", "tanh") == "tanh"):
        return f"the kernels take tanh RNN, GRU and LSTM layers, not {type(rnn).__name__}"
    if rnn.num_layers != 1:
        return f"the kernels take one layer, not {rnn.num_layers}"
    if rnn.weight_hh_l0.dtype != torch.float32:
        return f"the kernels take float32, not {rnn.weight_hh_l0.dtype}"
    if tokens.shape[1] < MIN_STEPS:
        return f"windows of fewer than {MIN_STEPS} steps run quicker on torch's layers"
    if isinstance(rnn, nn.LSTM) and lstm_path(rnn.input_size, rnn.hidden_size, tokens.shape[0]) != "compiled":
        return "torch's LSTM measured quicker than the compiled one on this machine"
    return None


def lstm_path(vocab: int, hidden: int, batch: int) -> str:
    """'compiled' or 'torch': which LSTM trains quicker here at this size, each as it runs (the compiled step on one
    torch thread and the helper thread, torch's on all of torch's threads), measured once for the machine."""
    name = f"lstm-step:{vocab}x{hidden}x{batch}"
    keep_freed_memory()  # as in training: freed pages kept for the next minibatch
    with torch.random.fork_rng():
        torch.manual_seed(0)
        candidates = fused.lstm_candidates(vocab, hidden, batch, steps=35, torch_threads_default=DEFAULT_THREADS)
    return choice.fastest(name, candidates, per_threads=False)


def forward(model: nn.Module, tokens: torch.Tensor, state):
    """The model's forward on the kernels: tokens (batch, steps) -> logits (steps * batch, vocab), time-major, and
    the last state, as torch's layers would give them."""
    bf16 = isinstance(model.rnn, nn.LSTM) and _autocast_on() and bf16_fast()
    with torch.autocast("cpu", enabled=False):  # the kernels set their own precision
        if bf16:
            return _lstm_bf16(model, tokens, state)
        outputs, state = _recurrence(model.rnn, tokens, state)  # (steps, batch, H)
        return _output(model.linear, outputs.reshape(-1, outputs.shape[-1])), state


def _recurrence(rnn: nn.Module, tokens: torch.Tensor, state):
    """The one-hot RNN, GRU or LSTM layer over a window: same parameters, same function."""
    share, weights = second_core_free(), (rnn.weight_ih_l0, rnn.weight_hh_l0, rnn.bias_ih_l0, rnn.bias_hh_l0)
    if isinstance(rnn, nn.LSTM):
        h0, c0 = state
        outputs, c_last = recurrence.OneHotLSTM.apply(tokens.T, h0[0], c0[0], *weights, share)
        return outputs, (outputs[-1:], c_last[None])
    if isinstance(rnn, nn.GRU):
        outputs = recurrence.OneHotGRU.apply(tokens.T, state[0], *weights, share)
    else:
        bias = rnn.bias_ih_l0 + rnn.bias_hh_l0  # both biases folded in once
        outputs = recurrence.OneHotTanhRNN.apply(tokens.T, state[0], rnn.weight_ih_l0, rnn.weight_hh_l0, bias, share)
    return outputs, outputs[-1:]  # the state: (1, batch, H)


def _output(linear: nn.Linear, outputs: torch.Tensor) -> torch.Tensor:
    """The output layer, (rows, H) -> (rows, vocab): oneDNN's matmuls for a training window's rows."""
    if recurrence.ONEDNN and outputs.shape[0] >= OUTPUT_MIN_ROWS:
        return recurrence.Linear.apply(outputs, linear.weight, linear.bias)
    return linear(outputs)


def _lstm_bf16(model: nn.Module, tokens: torch.Tensor, state):
    """The LSTM under CPU autocast where bf16 is quick: bf16 recurrent matmuls summed in float32, and the output
    layer, in the same compiled windows."""
    rnn, linear, (h0, c0) = model.rnn, model.linear, state
    weights = (rnn.weight_ih_l0, rnn.weight_hh_l0, rnn.bias_ih_l0, rnn.bias_hh_l0, linear.weight, linear.bias)
    logits, h_last, c_last = recurrence.OneHotLSTMLogits.apply(tokens.T, h0[0], c0[0], *weights, second_core_free())
    return logits, (h_last[None], c_last[None])


def sgd_step(model, optimizer, tokens, targets, state, grad_clip: float, amp: bool):
    """One whole training step without autograd where it applies (the engine serves the model and the optimizer is
    plain SGD): returns (the mean loss, a 0-d tensor; the last state), else None and the caller takes the autograd
    step. Under `amp` where bf16 is quick, the LSTM's step is all compiled (bf16 matmuls); otherwise float32."""
    if not (handles(model, tokens) and fused.plain_sgd(optimizer, list(model.parameters()))):
        return None
    lr = float(optimizer.param_groups[0]["lr"])
    if amp and isinstance(model.rnn, nn.LSTM) and bf16_fast():
        return fused.sgd_step(model, tokens, targets, state, lr, grad_clip)
    return fused.float32_step(model, tokens, targets, state, lr, grad_clip)


def threads_for(cpu_threads: int, model: nn.Module, window: tuple[int, int]) -> int:
    """The torch threads a CPU run of `model` on (batch, steps) windows takes: `cpu_threads`, or for 0 (auto) one
    when the engine serves the model (its helper thread takes the second core) and torch's own setting else."""
    if cpu_threads > 0:
        return cpu_threads
    return 1 if handles(model, torch.zeros(window, dtype=torch.int64)) else DEFAULT_THREADS


@contextmanager
def settings(cpu_threads: int, model: nn.Module, window: tuple[int, int]) -> Iterator[None]:
    """The block runs with the torch threads `threads_for` gives, on the CPU, with freed memory kept for the next
    minibatch; elsewhere it runs as it is."""
    if next(model.parameters()).device.type != "cpu":
        yield
        return
    keep_freed_memory()  # minibatches reuse the same pages instead of faulting in fresh ones
    with torch_threads(threads_for(cpu_threads, model, window)):
        yield


def device_name(threads: int) -> str:
    """'cpu (2 threads)', or with one torch thread on a machine of several cores 'cpu (1 thread + the recurrence's
    helper thread)'."""
    helper = " + the recurrence's helper thread" if threads == 1 and (os.cpu_count() or 1) > 1 else ""
    return f"cpu ({threads} thread{'s' if threads > 1 else ''}{helper})"


def engine(model: nn.Module, window: tuple[int, int]) -> str:
    """Which path trains `model` on (batch, steps) windows on this CPU, and why, in words: for the run's records."""
    reason = why_not(model, torch.zeros(window, dtype=torch.int64))
    if reason is not None:
        return f"torch's layers ({reason})"
    return f"compiled kernels ({native.instruction_set()}), two cores"


def matmuls(model: nn.Module, amp: bool, window: tuple[int, int]) -> str:
    """What `amp` means for this model's training matmuls on (batch, steps) windows on the CPU, in words."""
    if not amp:
        return "float32"
    if not handles(model, torch.zeros(window, dtype=torch.int64)):
        return "bf16 autocast (forward pass, torch's CPU layers)"
    if isinstance(model.rnn, nn.LSTM) and bf16_fast():
        return "bf16 recurrent matmuls (AVX512-BF16), float32 elsewhere"
    return "float32 (amp's bf16 kernels serve the LSTM on CPUs with AVX512-BF16)"


def _autocast_on() -> bool:
    """Whether CPU autocast is on (torch >= 2.4 takes a device type; 2.3, which the project accepts, does not)."""
    try:
        return torch.is_autocast_enabled("cpu")
    except TypeError:
        return torch.is_autocast_cpu_enabled()
