"""Model behaviour: the loss falls, decoding is deterministic, samples stay in the vocab, checkpoints are safe."""

import pickle

import pytest
import torch
from helpers import small_text

from rnnlm import cpu
from rnnlm.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from rnnlm.config import TrainConfig
from rnnlm.generate import MAX_PREDS, GenerationError, generate
from rnnlm.model import RNNLM
from rnnlm.tokens import build_vocab, encode, prepare_text
from rnnlm.train import TrainingDiverged, make_optimizer, train


@pytest.fixture(scope="module")
def tiny():
    text = prepare_text(small_text(2000), "book", "char")
    vocab = build_vocab(text, "char")
    return vocab, encode(text, vocab, "char")


def _train(vocab, ids, rnn="rnn", epochs=8, lr=1.0, seed=0):
    torch.manual_seed(seed)
    model = RNNLM(len(vocab), 32, rnn)
    config = TrainConfig(batch_size=8, num_steps=10, lr=lr, grad_clip=1.0, num_epochs=epochs, eval_every=4)
    state = train(model, ids[:-500], ids[-500:], config, make_optimizer(model, lr), torch.Generator().manual_seed(seed))
    return model, state


@pytest.mark.parametrize("rnn", ["rnn", "gru", "lstm"])
def test_loss_falls(tiny, rnn):
    vocab, ids = tiny
    _, state = _train(vocab, ids, rnn)
    ppl = [s.train_perplexity for s in state.history]
    assert ppl[-1] < 0.6 * ppl[0] and ppl[0] < len(vocab) * 1.5
    assert state.history[-1].val_perplexity is not None and state.best_val_perplexity < len(vocab)


def test_training_repeats_exactly_on_cpu(tiny):
    vocab, ids = tiny
    a, sa = _train(vocab, ids, epochs=3)
    b, sb = _train(vocab, ids, epochs=3)
    assert [s.train_perplexity for s in sa.history] == [s.train_perplexity for s in sb.history]
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


def test_divergence_names_the_epoch(tiny):
    vocab, ids = tiny
    with pytest.raises(TrainingDiverged, match="epoch 1.*lower --lr"):
        _train(vocab, ids, lr=1e6, epochs=3)


def test_greedy_generation_is_deterministic_and_in_vocab(tiny):
    vocab, ids = tiny
    model, _ = _train(vocab, ids, epochs=2)
    a = generate(model, vocab, ["time traveller", "the"], num_preds=30)
    b = generate(model, vocab, ["time traveller", "the"], num_preds=30, seed=123)
    assert a == b
    assert a[0].startswith("time traveller") and len(a[0]) == len("time traveller") + 30
    assert set("".join(a)) <= set(vocab.tokens)


def test_batched_generation_equals_one_prompt_at_a_time(tiny):
    vocab, ids = tiny
    model, _ = _train(vocab, ids, "lstm", epochs=2)
    prompts = ["the machine", "a", "time traveller said"]
    together = generate(model, vocab, prompts, num_preds=20)
    assert together == [generate(model, vocab, [p], num_preds=20)[0] for p in prompts]


def test_sampling_is_seeded_and_differs_from_greedy(tiny):
    vocab, ids = tiny
    model, _ = _train(vocab, ids, epochs=2)
    kwargs = dict(num_preds=80, temperature=1.0, top_k=5)
    assert generate(model, vocab, ["the"], seed=1, **kwargs) == generate(model, vocab, ["the"], seed=1, **kwargs)
    assert generate(model, vocab, ["the"], seed=1, **kwargs) != generate(model, vocab, ["the"], num_preds=80)


def test_low_temperature_matches_argmax(tiny):
    vocab, ids = tiny
    model, _ = _train(vocab, ids, epochs=2)
    cold = generate(model, vocab, ["the time"], num_preds=40, temperature=1e-4, top_k=28, seed=3)
    assert cold == generate(model, vocab, ["the time"], num_preds=40)


@pytest.mark.parametrize(
    "prompts, kwargs, message",
    [
        (["time?"], {}, "outside the vocabulary"),
        ([], {}, "non-empty list"),
        ([""], {}, "at least one token"),
        (["the"], {"num_preds": -1}, "num_preds"),
        (["the"], {"num_preds": MAX_PREDS + 1}, "num_preds"),
        (["the"], {"temperature": 0}, "temperature"),
        (["the"], {"top_k": 0}, "top_k"),
    ],
)
def test_bad_generation_requests(tiny, prompts, kwargs, message):
    vocab, _ = tiny
    model = RNNLM(len(vocab), 8)
    with pytest.raises(GenerationError, match=message):
        generate(model, vocab, prompts, **kwargs)


def test_checkpoint_roundtrip(tmp_path, tiny):
    vocab, ids = tiny
    model, _ = _train(vocab, ids, "gru", epochs=1)
    config = {"num_hiddens": 32, "rnn": "gru", "num_layers": 1, "tokenization": "char"}
    path = save_checkpoint(tmp_path / "m.pt", model=model.state_dict(), config=config, vocab=vocab.tokens, epoch=1)
    restored, restored_vocab, restored_config = model_from_checkpoint(load_checkpoint(path))
    assert restored_vocab == vocab and restored_config == config
    assert generate(restored, vocab, ["the"], num_preds=20) == generate(model, vocab, ["the"], num_preds=20)
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]  # the temporary file was renamed away


class _Exploit:
    def __reduce__(self):
        return (print, ("pwned",))


def test_checkpoint_with_pickled_code_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"model": {}, "payload": _Exploit()}, path, pickle_module=pickle)
    with pytest.raises(ValueError, match="weights_only"):
        load_checkpoint(path)


@pytest.mark.parametrize("rnn", ["rnn", "gru", "lstm"])
@pytest.mark.parametrize(
    "options", [{}, {"num_layers": 2, "embedding_dim": 6}, {"embedding_dim": 9, "adaptive_cutoffs": [5, 9]}]
)
def test_a_generation_step_is_the_models_forward_on_one_step(rnn, options):
    """`step` (torch's cell functions, for generation) gives what `forward_torch` gives on a one-step window: the
    same logits and state, for each layer type, deeper and embedded models and an adaptive softmax."""
    torch.manual_seed(0)
    model = RNNLM(13, 9, rnn, dropout=0.3, **options).eval()
    tokens = torch.randint(0, 13, (4,))
    state = model.begin_state(4)
    state = tuple(torch.randn_like(s) for s in state) if isinstance(state, tuple) else torch.randn_like(state)
    with torch.no_grad():
        logits, after = model.step(tokens, state)
        expected, expected_after = model.forward_torch(tokens[:, None], state)
    torch.testing.assert_close(logits, expected)
    for a, b in zip(
        after if isinstance(after, tuple) else (after,),
        expected_after if isinstance(after, tuple) else (expected_after,),
        strict=True,
    ):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("rnn", ["gru", "lstm"])
def test_dropout_between_torchs_layers_on_a_cpu_is_drawn_in_c_with_torchs_bits(monkeypatch, rnn):
    """On a CPU, torch's layers in training run a layer at a time with the dropout between them drawn by the
    engine's bernoulli_ (torch's bits, in C where the kernels are built): the same outputs, state, gradients and
    generator state afterwards as the stacked layer with torch's own dropout between its layers."""
    torch.manual_seed(0)
    model = RNNLM(50, 16, rnn, num_layers=3, embedding_dim=8, dropout=0.4)
    tokens, state = torch.randint(0, 50, (4, 9)), model.begin_state(4)
    drawn = []
    monkeypatch.setattr(
        cpu, "bernoulli_", lambda out, p, *value, real=cpu.bernoulli_: drawn.append(p) or real(out, p, *value)
    )
    results = []
    for stacked in (True, False):
        model.zero_grad()
        torch.manual_seed(1)
        if stacked:  # the embedding's rows, dropped out, then the three layers at once
            outputs, last = model.rnn(model.first_inputs(tokens.T), state)
        else:
            outputs, last = model.recurrent(tokens, state)
        outputs.sum().backward()
        results.append([outputs, *(last if rnn == "lstm" else [last]), *[p.grad for p in model.rnn.parameters()]])
        results[-1] += [model.embedding.weight.grad, torch.rand(2)]  # where the generator was left
    assert all(torch.equal(a, b) for a, b in zip(*results, strict=True))
    assert len(drawn) == 1 + 1 + 2  # the embedding's dropout each time, then the two between layers once
