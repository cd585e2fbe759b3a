"""The recurrent language model of D2L 8.6: one-hot input, a torch RNN/GRU/LSTM layer, a linear output layer (or,
for large vocabularies, an adaptive softmax)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from itertools import pairwise
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import _VF, nn

from rnnlm import cpu
from rnnlm.cpu import device_name as device_name  # the engine describes where and how a model trains
from rnnlm.cpu import engine_name as engine_name
from rnnlm.cpu import matmul_precision as matmul_precision

if TYPE_CHECKING:
    from rnnlm.config import TrainConfig

RNN_TYPES = {"rnn": nn.RNN, "gru": nn.GRU, "lstm": nn.LSTM}
CELLS = {"rnn": torch.rnn_tanh_cell, "gru": torch.gru_cell, "lstm": torch.lstm_cell}  # one step of a layer
LAYERS = {"rnn": _VF.rnn_tanh, "gru": _VF.gru, "lstm": _VF.lstm}  # what torch's layers call, on weights given

State = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


class RNNLM(nn.Module):
    """D2L's `RNNModel`: `rnn_type` in {'rnn', 'gru', 'lstm'} picks the torch layer (`getattr`-style swap).

    With `embedding_dim` 0 the inputs are the book's one-hot vectors, which the layer's input weights see directly
    (the parameters and the function are the book's). Otherwise tokens go through an embedding of that size, as in
    pytorch/examples' word language model: `dropout` on the embedding, between layers and before the output layer
    (off in evaluation and generation), and `tie_weights` shares the embedding with the output layer. With
    `adaptive_cutoffs` the output layer is an `AdaptiveSoftmax` (`self.adaptive`, `self.linear` None), whose logits
    are log-probabilities.

    AWD-LSTM's regularisers act in training only: `weight_drop` drops each layer's hidden-to-hidden weights with one
    mask per call (a minibatch), `embed_dropout` drops whole words from the inputs, and `locked_dropout` draws
    `dropout`'s masks once per sequence for all time steps (the layers then run one at a time). `regularisers` names
    the regularisers on, of the model and of its training (`build_model`); the CPU engine applies them with the
    functions here (`first_inputs` or `word_scales`, `recurrent_weights`, `dropped`).
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
        adaptive_cutoffs: tuple[int, ...] | list[int] = (),
        adaptive_div_value: float = 4.0,
        weight_drop: float = 0.0,
        embed_dropout: float = 0.0,
        locked_dropout: bool = False,
    ):
        super().__init__()
        if rnn_type not in RNN_TYPES:
            raise ValueError(f"unknown rnn type {rnn_type!r}; use one of {sorted(RNN_TYPES)}")
        if tie_weights and embedding_dim != num_hiddens:
            raise ValueError(f"tied weights need embedding_dim == num_hiddens, got {embedding_dim} and {num_hiddens}")
        self.vocab_size, self.num_hiddens, self.rnn_type = vocab_size, num_hiddens, rnn_type
        self.embedding = nn.Embedding(vocab_size, embedding_dim) if embedding_dim else None
        self.drop = nn.Dropout(dropout)
        self.weight_drop, self.embed_dropout = weight_drop, embed_dropout
        self.locked_dropout = bool(locked_dropout and dropout)
        self.regularisers = regularisers_on(
            {"weight_drop": weight_drop, "embed_dropout": embed_dropout, "locked_dropout": self.locked_dropout}
        )
        between = dropout if num_layers > 1 else 0.0  # torch's layers apply dropout between layers only
        self.rnn = RNN_TYPES[rnn_type](embedding_dim or vocab_size, num_hiddens, num_layers, dropout=between)
        self.linear, self.adaptive = None, None
        if adaptive_cutoffs:
            tied = self.embedding if tie_weights else None
            self.adaptive = AdaptiveSoftmax(
                num_hiddens, vocab_size, list(adaptive_cutoffs), adaptive_div_value, tied=tied
            )
        else:
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
        outputs, state = self.hidden_torch(tokens, state)
        return self.output_layer(outputs), state  # (steps * batch, vocab)

    @property
    def output_layer(self) -> nn.Module:
        """The module that turns the last layer's outputs into logits: the linear layer or the adaptive softmax."""
        return self.linear if self.linear is not None else self.adaptive

    def output_rows(self, words: torch.Tensor) -> list[tuple[nn.Parameter, torch.Tensor]]:
        """Where the output layer scores `words` (ids, int64): (parameter, its rows) for each parameter with a row or
        an entry of their own (the embedding's rows where it is tied to the output)."""
        if self.adaptive is not None:
            return self.adaptive.word_rows(words)
        return [(self.linear.weight, words), (self.linear.bias, words)]

    def step(self, tokens: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """One step without dropout, for generation: tokens (batch,) -> logits (batch, vocab), and the next state. Each
        layer is one call of torch's cell function (what its layer computes for one step, without the layer's checks
        per call)."""
        inputs = self.embedding(tokens) if self.embedding is not None else F.one_hot(tokens, self.vocab_size).float()
        rnn, lstm = self.rnn, self.rnn_type == "lstm"
        hidden, cells = [], []
        for layer in range(rnn.num_layers):
            weights = [getattr(rnn, f"{name}_l{layer}") for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
            if lstm:
                inputs, cell = torch.lstm_cell(inputs, (state[0][layer], state[1][layer]), *weights)
                cells.append(cell)
            else:
                inputs = CELLS[self.rnn_type](inputs, state[layer], *weights)
            hidden.append(inputs)
        return self.output_layer(inputs), ((torch.stack(hidden), torch.stack(cells)) if lstm else torch.stack(hidden))

    def hidden_torch(self, tokens: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """The last layer's outputs (num_steps * batch_size, num_hiddens), time-major, after dropout, on torch's
        layers, and the last state."""
        outputs, state = self.recurrent(tokens, state)  # (num_steps, batch_size, num_hiddens)
        return self.dropped(outputs).reshape(-1, self.num_hiddens), state

    def loss(self, tokens: torch.Tensor, targets: torch.Tensor, state: State, reduction: str = "mean"):
        """The cross-entropy of `targets` (batch_size, num_steps) given `tokens`, mean or summed over them, and the
        last state. On the CPU engine the output layer and the loss are one step, without keeping the logits; an
        adaptive softmax computes only its head and each target's cluster."""
        if cpu.handles(self, tokens):
            return cpu.loss(self, tokens, targets, state, reduction)
        outputs, state = self.hidden_torch(tokens, state)
        return self._output_loss(outputs, targets, reduction), state

    def _output_loss(self, outputs: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """The cross-entropy of `targets` (batch_size, num_steps) from the last layer's dropped outputs
        (num_steps * batch_size, num_hiddens), on torch's output layer: the full softmax or the adaptive one."""
        flat_targets = targets.T.reshape(-1)
        if self.adaptive is not None:
            return self.adaptive.loss(outputs, flat_targets, reduction)
        return F.cross_entropy(self.linear(outputs).float(), flat_targets, reduction=reduction)

    def penalised_loss(self, tokens, targets, state: State, ar_alpha: float = 0.0, tar_beta: float = 0.0):
        """(the mean cross-entropy of `targets`, AWD-LSTM's activation penalties, the last state) on torch's layers:
        AR is `ar_alpha` * the mean square of the last layer's dropped outputs, TAR `tar_beta` * the mean square of
        the steps between its outputs before dropout. Training adds the two; the cross-entropy is what it reports."""
        if cpu.handles(self, tokens):  # the layers compiled for the CPU, the penalties on torch's ops
            outputs, state = cpu.recurrent(self, tokens, state)  # (num_steps, batch_size, num_hiddens)
        else:
            outputs, state = self.recurrent(tokens, state)
        dropped = self.dropped(outputs)
        loss = self._output_loss(dropped.reshape(-1, self.num_hiddens), targets)
        penalty = ar_alpha * dropped.float().pow(2).mean()
        if len(outputs) > 1:
            penalty = penalty + tar_beta * (outputs[1:] - outputs[:-1]).float().pow(2).mean()
        return loss, penalty, state

    def recurrent(self, tokens: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """The last layer's outputs before the output dropout (num_steps, batch_size, num_hiddens), and the last
        state, on torch's layers: the stacked layer as it is, or (training with weight drop, locked dropout, or on a
        CPU dropout between layers) torch's layer function on the dropped weights, a layer at a time under locked
        dropout and on a CPU."""
        inputs = self.first_inputs(tokens.T)
        # on a CPU the dropout between layers draws its mask in C (`cpu.dropout`: torch's bits, 9x quicker)
        by_layer = self.locked_dropout or (self.rnn.dropout and inputs.device.type == "cpu")
        if not (self.training and (self.weight_drop or by_layer)):
            return self.rnn(inputs, state)
        weights = self.recurrent_weights()
        if not by_layer:
            return self._layers(inputs, state, [w for layer in weights for w in layer], self.rnn.dropout)
        last = []
        for layer, layer_weights in enumerate(weights):
            inputs = self.between_layers(inputs) if layer else inputs
            inputs, layer_last = self._layers(inputs, _layer_of(state, layer), layer_weights, 0.0)
            last.append(layer_last)
        if self.rnn_type == "lstm":
            return inputs, (torch.cat([h for h, _ in last]), torch.cat([c for _, c in last]))
        return inputs, torch.cat(last)

    def recurrent_weights(self) -> list[list[torch.Tensor]]:
        """Each layer's [W_ih, W_hh, b_ih, b_hh], W_hh with weight drop's mask (drawn now, once for the whole
        window) in training: DropConnect, scaled by 1 / (1 - p) as dropout is; the stored weights stay as they are."""
        names = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
        layers = [[getattr(self.rnn, f"{name}_l{layer}") for name in names] for layer in range(self.rnn.num_layers)]
        if self.training and self.weight_drop:
            for layer in layers:
                layer[1] = cpu.dropout(layer[1], self.weight_drop)
        return layers

    def _layers(self, inputs: torch.Tensor, state: State, weights: list[torch.Tensor], between: float):
        """torch's layer function (what `self.rnn` calls) over inputs (num_steps, batch, in) with `weights` (four a
        layer): (outputs (num_steps, batch, num_hiddens), the last state)."""
        layers, hx = len(weights) // 4, tuple(state) if self.rnn_type == "lstm" else state
        result = LAYERS[self.rnn_type](inputs, hx, weights, True, layers, between, self.training, False, False)
        return result[0], (tuple(result[1:]) if self.rnn_type == "lstm" else result[1])

    def between_layers(self, x: torch.Tensor) -> torch.Tensor:
        """A layer's outputs x (num_steps, batch, features) as the next layer's inputs: in training dropped out with
        locked dropout's mask (`dropped`) or dropout's between torch's layers (drawn by `cpu.dropout`: torch's bits);
        x itself in evaluation and without dropout."""
        if not (self.training and (self.locked_dropout or self.rnn.dropout)):
            return x
        return self.dropped(x) if self.locked_dropout else cpu.dropout(x, self.rnn.dropout)

    def dropped(self, x: torch.Tensor) -> torch.Tensor:
        """`dropout` on x (num_steps, batch, features): a mask per element, or under locked dropout one mask per
        sequence, the same at every time step; none in evaluation."""
        if not (self.training and self.locked_dropout):
            return cpu.dropout(x, self.drop.p, self.training)
        return x * cpu.keep_mask(x.new_empty(1, *x.shape[1:]), 1 - self.drop.p)

    def first_inputs(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (num_steps, batch_size) as the first layer's input: the embedding's rows (dropped out), or the
        book's one-hot vectors (num_steps, batch_size, vocab_size); without the words embedding dropout drops."""
        if self.embedding is not None:
            rows = self.embedding(tokens) if self.adaptive is None else self.adaptive.rows(self.embedding, tokens)
            return self.dropped(self._without_dropped_words(rows, tokens))
        return self._without_dropped_words(F.one_hot(tokens, self.vocab_size).float(), tokens)

    def _without_dropped_words(self, inputs: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Embedding dropout in training: the inputs of the words `word_scales` drops zero wherever they occur."""
        scales = self.word_scales()
        return inputs if scales is None else inputs * scales[tokens].unsqueeze(-1)

    def word_scales(self) -> torch.Tensor | None:
        """Embedding dropout's mask for this call in training, drawn now: a scale per word of the vocabulary, 0 for
        the words dropped (probability `embed_dropout`), 1 / (1 - p) for the others, as dropping the embedding's rows
        does; None when no word is dropped."""
        if not (self.training and self.embed_dropout):
            return None
        return cpu.keep_mask(self.rnn.weight_hh_l0.new_empty(self.vocab_size), 1 - self.embed_dropout)

    def begin_state(self, batch_size: int, device: torch.device | str = "cpu") -> State:
        """Zero state: (num_layers, batch_size, num_hiddens), a pair of them for the LSTM."""
        shape = (self.rnn.num_layers, batch_size, self.num_hiddens)
        if self.rnn_type == "lstm":
            return torch.zeros(shape, device=device), torch.zeros(shape, device=device)
        return torch.zeros(shape, device=device)


MODEL_OPTIONS = (  # what older checkpoints may lack
    "embedding_dim", "dropout", "tie_weights", "adaptive_cutoffs", "weight_drop", "embed_dropout", "locked_dropout",
    "adaptive_div_value",
)  # fmt: skip
# AWD-LSTM's regularisers, of the model and of its training, by their config fields: each is on when its value is
# true (a rate above 0, a flag set), and NT-ASGD when the optimizer is "ntasgd"
REGULARISERS = ("weight_drop", "embed_dropout", "locked_dropout", "ar_alpha", "tar_beta", "variable_steps")


def regularisers_on(config: Mapping[str, Any]) -> tuple[str, ...]:
    """The names of the regularisers `config` (config fields by name) turns on."""
    on = tuple(name for name in REGULARISERS if config.get(name))
    return (*on, "ntasgd") if config.get("optimizer") == "ntasgd" else on


def build_model(config: TrainConfig | Mapping[str, Any], vocab_size: int) -> RNNLM:
    """The model `config` describes over `vocab_size` tokens, for training and for loading alike: `config` is a
    TrainConfig or a checkpoint's config dict (whose older versions lack some options: those keep RNNLM's defaults).
    The model's `regularisers` name those of its training too."""
    given = config if isinstance(config, Mapping) else config.model_dump()
    options = {name: given[name] for name in MODEL_OPTIONS if name in given}
    model = RNNLM(vocab_size, given["num_hiddens"], given["rnn"], given["num_layers"], **options)
    model.regularisers = tuple(dict.fromkeys((*model.regularisers, *regularisers_on(given))))
    return model


class _TiedRows(torch.autograd.Function):
    """(an embedding's rows for `tokens`, the head's weight: its first `count` rows, then `clusters`) with one
    gradient for the weight: the lookup's (torch's own embedding backward) plus the head rows' in place, the same sums
    as autograd's for the two uses."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, tokens: torch.Tensor, count: int, clusters: torch.Tensor):
        ctx.save_for_backward(tokens)
        ctx.num_weights, ctx.count = weight.shape[0], count
        return F.embedding(tokens, weight), torch.cat([weight[:count], clusters])

    @staticmethod
    def backward(ctx, grad_rows: torch.Tensor, grad_head: torch.Tensor | None):
        (tokens,) = ctx.saved_tensors
        grad = torch.ops.aten.embedding_dense_backward(grad_rows, tokens, ctx.num_weights, -1, False)
        if grad_head is None:
            return grad, None, None, None
        grad[: ctx.count] += grad_head[: ctx.count]
        return grad, None, None, grad_head[ctx.count :]


class AdaptiveSoftmax(nn.Module):
    """The adaptive softmax of Grave et al. (2017) over a vocabulary ranked by frequency, as torch's
    AdaptiveLogSoftmaxWithLoss with the head's word weights optionally tied to an embedding's first rows.

    The head scores the words below `cutoffs[0]` and one entry per tail cluster; cluster i scores the words from
    `cutoffs[i]` to the next cutoff (or the vocabulary's end) through a projection of the hidden state `div_value`
    ** (i + 1) times narrower. The loss costs the head plus, for each target, its own cluster: about vocab /
    cutoffs[0] times less than the full softmax when most tokens are frequent words.
    """

    # the head's weight `rows` built for this forward's `head`, and the weights' versions then; a class default, so
    # that a model pickled before it existed (an MLflow model registered earlier) loads and runs
    _pending: tuple[torch.Tensor, tuple[int, int]] | None = None

    def __init__(self, hidden: int, vocab: int, cutoffs: list[int], div_value: float = 4.0, tied=None):
        super().__init__()
        if not cutoffs or list(cutoffs) != sorted(set(cutoffs)) or cutoffs[0] < 1 or cutoffs[-1] >= vocab:
            raise ValueError(f"adaptive cutoffs must rise strictly from >= 1 to below the vocabulary size {vocab}")
        self.cutoffs = [*cutoffs, vocab]
        bound = 1 / math.sqrt(hidden)  # nn.Linear's initialisation
        self.words = None if tied is not None else nn.Parameter(torch.empty(cutoffs[0], hidden).uniform_(-bound, bound))
        self.clusters = nn.Parameter(torch.empty(len(cutoffs), hidden).uniform_(-bound, bound))
        self.head_bias = nn.Parameter(torch.zeros(cutoffs[0] + len(cutoffs)))
        sizes = [max(1, int(hidden // div_value ** (i + 1))) for i in range(len(cutoffs))]
        self.tails = nn.ModuleList(
            nn.Sequential(nn.Linear(hidden, size, bias=False), nn.Linear(size, high - low, bias=False))
            for size, (low, high) in zip(sizes, pairwise(self.cutoffs), strict=True)
        )
        object.__setattr__(self, "tied", tied)  # not a submodule: the model holds the embedding once

    def word_rows(self, words: torch.Tensor) -> list[tuple[nn.Parameter, torch.Tensor]]:
        """(parameter, rows) that score `words` (ids, int64): the head's word weights and biases, each cluster's
        output rows; parameters with none of them are left out."""
        head = words[words < self.cutoffs[0]]
        found = [(self.words if self.tied is None else self.tied.weight, head), (self.head_bias, head)]
        for tail, (low, high) in zip(self.tails, pairwise(self.cutoffs), strict=True):
            found.append((tail[1].weight, words[(words >= low) & (words < high)] - low))
        return [(parameter, rows) for parameter, rows in found if rows.numel()]

    def rows(self, embedding: nn.Embedding, tokens: torch.Tensor) -> torch.Tensor:
        """The embedding's rows for `tokens`. With the head tied to that embedding and gradients on, the head's weight
        comes from the same call (`_TiedRows`), kept for this forward's `head`: the embedding then gets one gradient
        buffer for both uses instead of one each and their sum (two passes less over it a minibatch)."""
        if self.tied is not embedding or not (torch.is_grad_enabled() and embedding.weight.requires_grad):
            return embedding(tokens)
        rows, head = _TiedRows.apply(embedding.weight, tokens, self.cutoffs[0], self.clusters)
        self._pending = (head, self._versions())
        return rows

    def head(self, hs: torch.Tensor) -> torch.Tensor:
        """The head's log-probabilities (rows, cutoffs[0] + clusters)."""
        return F.log_softmax(F.linear(hs, self._head_weight(), self.head_bias), dim=-1)

    def _head_weight(self) -> torch.Tensor:
        """The head's weight (cutoffs[0] + clusters, hidden): its words' rows, then one per cluster; with tied words,
        the one `rows` built in this forward (once, while the weights are unchanged and gradients are on)."""
        if self.tied is None:
            return torch.cat([self.words, self.clusters])
        pending, self._pending = self._pending, None
        if pending is not None and torch.is_grad_enabled() and pending[1] == self._versions():
            return pending[0]
        return torch.cat([self.tied.weight[: self.cutoffs[0]], self.clusters])

    def _versions(self) -> tuple[int, int]:
        """The versions of the tied embedding's weight and of the clusters' (an optimizer's step changes them)."""
        return self.tied.weight._version, self.clusters._version

    def __getstate__(self) -> dict:
        """Copies and pickles without a forward's pending head weight (a tensor of its graph)."""
        return {**super().__getstate__(), "_pending": None}

    def forward(self, hs: torch.Tensor) -> torch.Tensor:
        """Every word's log-probability, (rows, vocab), for generation and as logits."""
        head, first = self.head(hs), self.cutoffs[0]
        parts = [head[:, :first]]
        for i, tail in enumerate(self.tails):
            parts.append(head[:, first + i, None] + F.log_softmax(tail(hs), dim=-1))
        return torch.cat(parts, dim=1)

    def loss(self, hs: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """The negative log-likelihood of `targets` (rows,), mean or summed, from the head and each target's
        cluster only: the head's cross-entropy of each target's head entry (its word, or its cluster's entry) plus
        the clusters' cross-entropies of their own targets. The head's runs in C on a CPU (`cpu.linear_loss`)."""
        first, head_targets = self.cutoffs[0], targets.clone()
        total = hs.new_zeros((), dtype=torch.float32)
        for i, (tail, (low, high)) in enumerate(zip(self.tails, pairwise(self.cutoffs), strict=True)):
            rows = ((targets >= low) & (targets < high)).nonzero().squeeze(1)
            if rows.numel():
                head_targets[rows] = first + i
                scores = F.log_softmax(tail(hs[rows]).float(), dim=-1)
                total = total - scores.gather(1, (targets[rows] - low)[:, None]).sum()
        total = total + cpu.linear_loss(hs.float(), self._head_weight(), self.head_bias, head_targets)
        return total if reduction == "sum" else total / len(targets)


def _layer_of(state: State, layer: int) -> State:
    """One layer's part of a state, keeping its layer dimension: (1, batch, num_hiddens), a pair for the LSTM."""
    if isinstance(state, tuple):
        return tuple(s[layer : layer + 1] for s in state)
    return state[layer : layer + 1]


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
