"""The recurrent language model of D2L 8.6: one-hot input, a torch RNN/GRU/LSTM layer, a linear output layer."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rnnlm import cpu

RNN_TYPES = {"rnn": nn.RNN, "gru": nn.GRU, "lstm": nn.LSTM}

State = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


class RNNLM(nn.Module):
    """D2L's `RNNModel`: `rnn_type` in {'rnn', 'gru', 'lstm'} picks the torch layer (`getattr`-style swap).

    With `embedding_dim` 0 the inputs are the book's one-hot vectors, which the layer's input weights see directly
    (the parameters and the function are the book's). Otherwise tokens go through an embedding of that size, as in
    pytorch/examples' word language model: `dropout` on the embedding, between layers and before the output layer
    (off in evaluation and generation), and `tie_weights` shares the embedding with the output layer.
    """

    def __init__(
        self,
        vocab_size: int,
        num_hiddens: int,
        rnn_type: str = "rnn",
        num_layers: int = 1,
        embedding_dim: int = 0,
        dropout: float = 0.0,
        tie_weights: bool = False,
    ):
        super().__init__()
        if rnn_type not in RNN_TYPES:
            raise ValueError(f"unknown rnn type {rnn_type!r}; use one of {sorted(RNN_TYPES)}")
        if tie_weights and embedding_dim != num_hiddens:
            raise ValueError(f"tied weights need embedding_dim == num_hiddens, got {embedding_dim} and {num_hiddens}")
        self.vocab_size, self.num_hiddens, self.rnn_type = vocab_size, num_hiddens, rnn_type
        self.embedding = nn.Embedding(vocab_size, embedding_dim) if embedding_dim else None
        self.drop = nn.Dropout(dropout)
        between = dropout if num_layers > 1 else 0.0  # torch's layers apply dropout between layers only
        self.rnn = RNN_TYPES[rnn_type](embedding_dim or vocab_size, num_hiddens, num_layers, dropout=between)
        self.linear = nn.Linear(num_hiddens, vocab_size)
        if tie_weights:
            self.linear.weight = self.embedding.weight

    def forward(self, tokens: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """tokens (batch_size, num_steps) int64 -> logits (num_steps * batch_size, vocab_size), time-major."""
        if cpu.handles(self, tokens):  # the same function, compiled for the CPU (rnnlm/cpu)
            return cpu.forward(self, tokens, state)
        return self.forward_torch(tokens, state)

    def forward_torch(self, tokens: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """`forward` on torch's layers, whatever the device."""
        outputs, state = self.rnn(self._inputs(tokens.T), state)  # (num_steps, batch_size, num_hiddens)
        return self.linear(self.drop(outputs).reshape(-1, self.num_hiddens)), state  # (steps * batch, vocab)

    def loss(self, tokens: torch.Tensor, targets: torch.Tensor, state: State, reduction: str = "mean"):
        """The cross-entropy of `targets` (batch_size, num_steps) given `tokens`, mean or summed over them, and the
        last state. On the CPU engine the output layer and the loss are one step, without keeping the logits."""
        if cpu.handles(self, tokens):
            return cpu.loss(self, tokens, targets, state, reduction)
        logits, state = self.forward_torch(tokens, state)
        return F.cross_entropy(logits.float(), targets.T.reshape(-1), reduction=reduction), state

    def _inputs(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (num_steps, batch_size) as the first layer's input: the embedding's rows (dropped out), or the
        book's one-hot vectors (num_steps, batch_size, vocab_size)."""
        if self.embedding is not None:
            return self.drop(self.embedding(tokens))
        return F.one_hot(tokens, self.vocab_size).float()

    def begin_state(self, batch_size: int, device: torch.device | str = "cpu") -> State:
        """Zero state: (num_layers, batch_size, num_hiddens), a pair of them for the LSTM."""
        shape = (self.rnn.num_layers, batch_size, self.num_hiddens)
        if self.rnn_type == "lstm":
            return torch.zeros(shape, device=device), torch.zeros(shape, device=device)
        return torch.zeros(shape, device=device)


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


def device_name(model: RNNLM, cpu_threads: int, window: tuple[int, int]) -> str:
    """Where `model` trains, in words, e.g. 'cuda:0 (NVIDIA H200)' or 'cpu (2 threads)'; `cpu_threads` 0 is auto
    (see `rnnlm.cpu.threads_for`), for (batch, steps) training windows."""
    device = next(model.parameters()).device
    if device.type == "cuda":
        return f"cuda:{device.index or 0} ({torch.cuda.get_device_name(device)})"
    return cpu.device_name(cpu.threads_for(cpu_threads, model, window)) if device.type == "cpu" else str(device)


def engine_name(model: RNNLM, window: tuple[int, int]) -> str:
    """Which code trains `model` on (batch, steps) windows here, and why: the CPU engine, or torch's layers (with
    the reason), or cuDNN's on a GPU."""
    device = next(model.parameters()).device
    if device.type == "cuda":
        return "torch's layers (cuDNN)"
    return cpu.engine(model, window) if device.type == "cpu" else f"torch's layers ({device.type})"


def matmul_precision(model: RNNLM, amp: bool, window: tuple[int, int]) -> str:
    """What `amp` means for this model where it is, in words: the precision its training matmuls take on (batch,
    steps) windows."""
    if next(model.parameters()).device.type == "cpu":
        return cpu.matmuls(model, amp, window)
    return "bf16 autocast (forward pass)" if amp else "float32"
