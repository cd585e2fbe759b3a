"""GPU-only checks (marked `gpu`, skipped without CUDA): no host sync inside an epoch, cuDNN and bf16 paths train."""

import pytest
import torch

from rnnlm.batches import sequential_batches
from rnnlm.config import TrainConfig
from rnnlm.model import RNNLM
from rnnlm.train import _step, make_optimizer, train

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.fixture(scope="module")
def corpus(char_ids):
    vocab_size, ids = char_ids(3000)
    return vocab_size, ids.cuda()


@pytest.mark.parametrize("rnn", ["rnn", "gru", "lstm"])
@pytest.mark.parametrize("amp", [False, True])
def test_batches_never_synchronise(corpus, rnn, amp):
    vocab_size, ids = corpus
    model = RNNLM(vocab_size, 64, rnn).cuda()
    settings = TrainConfig(batch_size=16, num_steps=20, lr=1.0, grad_clip=1.0, num_epochs=1, amp=amp)
    optimizer, hidden = make_optimizer(model, 1.0), model.begin_state(16, "cuda")
    batches = list(sequential_batches(ids, 16, 20, torch.Generator().manual_seed(0)))
    _step(model, *batches[0], hidden, optimizer, settings)  # warm-up: cuDNN and allocator set-up may sync
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any synchronising call in the loop raises
    try:
        total = torch.zeros((), device="cuda")
        for inputs, targets in batches[1:]:
            loss, hidden = _step(model, inputs, targets, hidden, optimizer, settings)
            hidden = hidden.detach() if not isinstance(hidden, tuple) else tuple(h.detach() for h in hidden)
            total += loss
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.isfinite(total).item()


@pytest.mark.parametrize("amp", [False, True])
def test_training_on_gpu_lowers_perplexity(corpus, amp):
    vocab_size, ids = corpus
    torch.manual_seed(0)
    model = RNNLM(vocab_size, 64, "lstm").cuda()
    settings = TrainConfig(batch_size=16, num_steps=20, lr=1.0, grad_clip=1.0, num_epochs=8, amp=amp)
    optimizer, generator = make_optimizer(model, 1.0), torch.Generator().manual_seed(0)
    ids = ids.cpu().numpy()  # the trainer takes token arrays and moves them to the model's device
    ppl = [s.train_perplexity for s in train(model, ids, ids[:0], settings, optimizer, generator).history]
    assert ppl[-1] < 0.6 * ppl[0]


def test_the_run_says_what_amp_means_on_the_gpu():
    from rnnlm.model import matmul_precision

    model = RNNLM(5, 4, "lstm").cuda()
    assert matmul_precision(model, True, (2, 8)).startswith("bf16 autocast")
    assert matmul_precision(model, False, (2, 8)) == "float32"
