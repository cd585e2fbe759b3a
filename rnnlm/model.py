"""The recurrent language model of D2L 8.6: one-hot input, a fused torch RNN/GRU/LSTM, a linear output layer.

On the CPU the one-layer tanh RNN (the book's experiment), GRU and LSTM run through `rnnlm.recurrence`, hand-written
recurrences with the same parameters: whole windows in compiled C on two cores (oneDNN's per-step matmuls where no C
compiler is found), and the weights' gradients for all time steps in one large matmul instead of small ones per step.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from rnnlm import recurrence

RNN_TYPES = {"rnn": nn.RNN, "gru": nn.GRU, "lstm": nn.LSTM}

State = torch.Tensor | tuple[torch.Tensor, torch.Tensor]

# Shortest window for the hand-written kernels: one step costs 213 us (RNN) / 252 us (GRU) through them, mostly
# weight packing, against 35 / 52 us through torch's layers; from about 8 steps on the kernels are ahead.
KERNEL_MIN_STEPS = 8
# Fewest rows for which the output layer goes through oneDNN: 35 us against torch's 56 at 256 rows, 22 against 17 at 64
OUTPUT_MIN_ROWS = 128


class RNNLM(nn.Module):
    """D2L's `RNNModel`: `rnn_type` in {'rnn', 'gru', 'lstm'} picks the fused torch layer (`getattr`-style swap).

    Inputs are the book's one-hot vectors; the layer's input weights see them directly, so the parameters and the
    function computed are exactly the book's.
    """

    def __init__(self, vocab_size: int, num_hiddens: int, rnn_type: str = "rnn", num_layers: int = 1):
        super().__init__()
        if rnn_type not in RNN_TYPES:
            raise ValueError(f"unknown rnn type {rnn_type!r}; use one of {sorted(RNN_TYPES)}")
        self.vocab_size, self.num_hiddens, self.rnn_type = vocab_size, num_hiddens, rnn_type
        self.rnn = RNN_TYPES[rnn_type](vocab_size, num_hiddens, num_layers)
        self.linear = nn.Linear(num_hiddens, vocab_size)

    def forward(self, tokens: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """tokens (batch_size, num_steps) int64 -> logits (num_steps * batch_size, vocab_size), time-major."""
        if self.uses_kernels(tokens):
            bf16 = self.rnn_type == "lstm" and _autocast_on_cpu() and recurrence.bf16_enabled()
            with torch.autocast("cpu", enabled=False):  # the kernels set their own precision
                if bf16:
                    return self._lstm_bf16(tokens, state)
                outputs, state = self._recurrence(tokens, state)
                return self._output(outputs.reshape(-1, outputs.shape[-1])), state
        inputs = F.one_hot(tokens.T, self.vocab_size).float()  # (num_steps, batch_size, vocab_size)
        outputs, state = self.rnn(inputs, state)  # (num_steps, batch_size, num_hiddens)
        return self._output(outputs.reshape(-1, outputs.shape[-1])), state

    def _output(self, outputs: torch.Tensor) -> torch.Tensor:
        """The output layer: (rows, num_hiddens) -> (rows, vocab_size) logits; oneDNN's matmuls on the CPU for a
        training window's rows (for generation's few rows torch's call is quicker: 4 us against 17 for one row)."""
        if (
            recurrence.ONEDNN
            and outputs.shape[0] >= OUTPUT_MIN_ROWS
            and outputs.device.type == "cpu"
            and outputs.dtype == torch.float32
            and not _autocast_on_cpu()
        ):
            return recurrence.Linear.apply(outputs, self.linear.weight, self.linear.bias)
        return self.linear(outputs)

    def uses_kernels(self, tokens: torch.Tensor) -> bool:
        """The hand-written recurrences serve one-layer models on the CPU in float32 (GPUs have cuDNN's fused
        kernels): the tanh RNN and GRU always (compiled, or else through oneDNN), the LSTM when the compiled kernels
        are built (torch's CPU LSTM is oneDNN's fused kernel, which only they beat). Only for windows of at least
        `KERNEL_MIN_STEPS` steps: packing the weights costs more than a few steps, so generation's one-step calls
        stay on torch's layers. Under CPU autocast (`amp`) too: the LSTM's kernels then take bf16 matmuls, the tanh
        RNN's and GRU's stay float32 (they are already quicker than torch's bf16 layers)."""
        return (
            tokens.device.type == "cpu"
            and tokens.shape[1] >= KERNEL_MIN_STEPS
            and (self.rnn_type in ("rnn", "gru") or (self.rnn_type == "lstm" and recurrence.native_enabled()))
            and self.rnn.num_layers == 1
            and getattr(self.rnn, "nonlinearity", "tanh") == "tanh"
            and self.rnn.weight_hh_l0.dtype == torch.float32
        )

    def _recurrence(self, tokens: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """The book's one-hot RNN, GRU or LSTM through `rnnlm.recurrence`: same parameters, same function."""
        rnn, overlap = self.rnn, recurrence.overlap_enabled()
        if self.rnn_type == "lstm":
            h0, c0 = state
            weights = (rnn.weight_ih_l0, rnn.weight_hh_l0, rnn.bias_ih_l0, rnn.bias_hh_l0)
            outputs, c_last = recurrence.OneHotLSTM.apply(tokens.T, h0[0], c0[0], *weights, overlap)
            return outputs, (outputs[-1:], c_last[None])
        if self.rnn_type == "gru":
            outputs = recurrence.OneHotGRU.apply(
                tokens.T, state[0], rnn.weight_ih_l0, rnn.weight_hh_l0, rnn.bias_ih_l0, rnn.bias_hh_l0, overlap
            )
        else:
            bias = rnn.bias_ih_l0 + rnn.bias_hh_l0  # both biases folded in once
            outputs = recurrence.OneHotTanhRNN.apply(
                tokens.T, state[0], rnn.weight_ih_l0, rnn.weight_hh_l0, bias, overlap
            )  # (num_steps, batch_size, H)
        return outputs, outputs[-1:]  # the state: (1, batch_size, num_hiddens)

    def _lstm_bf16(self, tokens: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """The LSTM under CPU autocast where bf16 is quick: bf16 recurrent matmuls, summed in float32, and the output
        layer, in the same compiled windows (`recurrence.OneHotLSTMLogits`)."""
        rnn, (h0, c0) = self.rnn, state
        weights = (rnn.weight_ih_l0, rnn.weight_hh_l0, rnn.bias_ih_l0, rnn.bias_hh_l0)
        logits, h_last, c_last = recurrence.OneHotLSTMLogits.apply(
            tokens.T, h0[0], c0[0], *weights, self.linear.weight, self.linear.bias, recurrence.overlap_enabled()
        )
        return logits, (h_last[None], c_last[None])

    def begin_state(self, batch_size: int, device: torch.device | str = "cpu") -> State:
        """Zero state: (num_layers, batch_size, num_hiddens), a pair of them for the LSTM."""
        shape = (self.rnn.num_layers, batch_size, self.num_hiddens)
        if self.rnn_type == "lstm":
            return torch.zeros(shape, device=device), torch.zeros(shape, device=device)
        return torch.zeros(shape, device=device)


def _autocast_on_cpu() -> bool:
    """Whether CPU autocast is on (torch >= 2.4 takes a device type; 2.3, which the project accepts, does not)."""
    try:
        return torch.is_autocast_enabled("cpu")
    except TypeError:
        return torch.is_autocast_cpu_enabled()


def detach_state(state: State) -> State:
    """Cut the graph at a batch boundary (truncated BPTT) while keeping the values."""
    return tuple(s.detach() for s in state) if isinstance(state, tuple) else state.detach()


def pick_device(preference: str = "auto") -> torch.device:
    """'auto' -> CUDA, then Apple MPS, then CPU; an explicit choice that is not available is an error."""
    available = {
        "cuda": torch.cuda.is_available(),
        "mps": getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available(),
        "cpu": True,
    }
    if preference == "auto":
        return torch.device(next(name for name in ("cuda", "mps", "cpu") if available[name]))
    if not available.get(preference, False):
        raise ValueError(f"device {preference!r} is not available on this machine; use --device auto or cpu")
    return torch.device(preference)


def matmul_precision(model: RNNLM, device: torch.device, amp: bool) -> str:
    """What `amp` means for this model here, in words: the precision its training matmuls take."""
    if not amp:
        return "float32"
    if device.type != "cpu":
        return "bf16 autocast (forward pass)"
    window = torch.zeros(1, KERNEL_MIN_STEPS, dtype=torch.int64)  # a training window: the kernels' case
    if not model.uses_kernels(window):
        return "bf16 autocast (forward pass, torch's CPU layers)"
    if model.rnn_type == "lstm" and recurrence.bf16_enabled():
        return "bf16 recurrent matmuls (AVX512-BF16), float32 elsewhere"
    return "float32 (amp's bf16 kernels serve the LSTM on CPUs with AVX512-BF16)"


def device_name(device: torch.device, cpu_threads: int = 0) -> str:
    """Human-readable device, e.g. 'cuda:0 (NVIDIA H200)' or 'cpu (2 threads)'; `cpu_threads` 0 = torch's setting.
    With one torch thread on a machine of several cores, the recurrences use a second core
    (`recurrence.overlap_enabled`), and the name says so."""
    if device.type == "cuda":
        return f"cuda:{torch.cuda.current_device()} ({torch.cuda.get_device_name()})"
    if device.type == "cpu":
        threads = cpu_threads or torch.get_num_threads()
        helper = " + the recurrence's helper thread" if threads == 1 and (os.cpu_count() or 1) > 1 else ""
        return f"cpu ({threads} thread{'s' if threads > 1 else ''}{helper})"
    return str(device)
