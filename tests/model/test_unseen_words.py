"""mask_unseen: the output weights of tokens that never occur in the training text (in the vocabulary from held-out
text) get no gradient, on the CPU engine and on torch's layers, for the full and the adaptive softmax."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rnnlm import cpu
from rnnlm.config import TrainConfig
from rnnlm.evaluate import evaluate_loss
from rnnlm.model import build_model
from rnnlm.train import make_optimizer, train, unseen_rows

VOCAB, SEEN = 100, 90  # the training ids are 0..89: 90..99 occur only in the held-out text


def _config(adaptive: bool, tied: bool, **changes) -> TrainConfig:
    base = dict(rnn="lstm", num_layers=2, num_hiddens=32, embedding_dim=32, tie_weights=tied, dropout=0.1)
    base |= dict(optimizer="adamw", lr=0.01, batch_size=4, num_steps=10, num_epochs=2, grad_clip=1.0)
    return TrainConfig(**(base | {"adaptive_cutoffs": [20, 60] if adaptive else []} | changes))


def _trained(config: TrainConfig, train_ids: np.ndarray):
    torch.manual_seed(0)
    model = build_model(config, VOCAB)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    train(model, train_ids, train_ids[:0], config, make_optimizer(model, config.lr, config), torch.Generator())
    return model, before


def _ids(seed: int = 0, high: int = SEEN, size: int = 2000) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, high, size)


@pytest.mark.parametrize("engine", [True, False], ids=["cpu-engine", "torch-layers"])
@pytest.mark.parametrize("adaptive", [True, False], ids=["adaptive", "full-softmax"])
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_unseen_words_keep_their_output_weights_and_every_other_row_trains(monkeypatch, engine, adaptive, tied):
    monkeypatch.setattr(cpu, "ENABLED", engine and cpu.ENABLED)
    model, before = _trained(_config(adaptive, tied, mask_unseen=True), _ids())
    held = unseen_rows(model, torch.as_tensor(_ids()))
    names = {id(p): name for name, p in model.named_parameters()}
    assert held and sum(len(rows) for p, rows in held if p.dim() == 2) == VOCAB - SEEN
    for parameter, rows in held:
        moved = (parameter.detach() - before[names[id(parameter)]]).abs()
        kept = torch.zeros(len(parameter), dtype=torch.bool).index_fill_(0, rows, True)
        moved = moved.reshape(len(parameter), -1).amax(1)
        assert torch.all(moved[kept] == 0), names[id(parameter)]
        assert torch.all(moved[~kept] > 0), names[id(parameter)]  # the seen words' rows all trained


def test_with_every_word_seen_mask_unseen_trains_exactly_as_without():
    ids = _ids(high=VOCAB, size=3000)
    assert len(np.unique(ids)) == VOCAB
    on, _ = _trained(_config(True, True, mask_unseen=True), ids)
    off, _ = _trained(_config(True, True), ids)
    for (name, a), b in zip(on.named_parameters(), off.parameters(), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("adaptive", [True, False], ids=["adaptive", "full-softmax"])
def test_held_out_text_of_unseen_words_scores_better_masked_under_adamw(adaptive):
    """Without the mask AdamW pushes the unseen words' scores down a full step every minibatch; held out, they
    cost far more than the model's prior for them."""
    held_out = torch.as_tensor(_ids(1, VOCAB, 600))
    losses = {}
    for mask in (False, True):
        model, _ = _trained(_config(adaptive, True, mask_unseen=mask, num_epochs=4), _ids())
        unseen = held_out[1:] >= SEEN
        model.eval()
        with torch.no_grad():
            hs, _ = model.hidden_torch(held_out[None, :-1], model.begin_state(1))
            log_probs = torch.log_softmax(model.output_layer(hs), -1)  # the adaptive softmax's are already
            nll = -log_probs.gather(1, held_out[1:, None]).squeeze(1)
        losses[mask] = float(nll[unseen].mean()), evaluate_loss(model, held_out, 1, 50)
    assert losses[True][0] < losses[False][0] - 1.0, losses  # a nat a token at least
    assert losses[True][1] < losses[False][1], losses
