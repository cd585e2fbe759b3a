"""The engine's dropout masks: torch's own bits from torch's default generator, drawn by the kernels, so that a
model draws the same masks on the engine as on torch's layers and a resumed run the same as an uninterrupted one."""

import pytest
import torch

from rnnlm import cpu
from rnnlm.cpu import native

needs_build = pytest.mark.skipif(not cpu.compiled(), reason="no C compiler here: the compiled kernels are not built")


@needs_build
@pytest.mark.parametrize("used", [0, 1, 2, 623, 624, 625, 1248])  # words of the generator used before
@pytest.mark.parametrize("n", [0, 1, 311, 312, 313, 5000])  # two words an element: blocks of 624 end mid-element
@pytest.mark.parametrize("p", [0.0, 0.8, 0.5, 1.0])
def test_the_kernels_bernoulli_draws_torchs_bits_and_leaves_its_generator_where_torch_does(used, n, p):
    draws = []
    for draw in (lambda out: out.bernoulli_(p), lambda out: native.bernoulli_(out, p)):
        torch.manual_seed(3)
        torch.rand(used)  # a float32 draw takes one word each
        mask = draw(torch.empty(n))
        draws.append((mask, torch.get_rng_state(), torch.rand(4), torch.randn(3)))
    (mask, state, after, normal), (theirs, their_state, their_after, their_normal) = draws
    assert torch.equal(mask, theirs) and torch.equal(state, their_state)
    assert torch.equal(after, their_after) and torch.equal(normal, their_normal)
    if 0 < p < 1 and n > 300:
        assert 0.5 * p < mask.mean() < min(1.0, 1.5 * p)


@needs_build
def test_engine_dropout_gives_torchs_output_and_gradient_and_checks_what_it_is_given():
    x = torch.randn(35, 4, 16, requires_grad=True)
    results = []
    for drop in (cpu.dropout, torch.nn.functional.dropout):
        torch.manual_seed(5)
        y = drop(x, 0.3)
        (y * torch.arange(y.numel()).reshape(y.shape)).sum().backward()
        results.append((y, x.grad, torch.get_rng_state()))
        x.grad = None
    assert all(torch.equal(a, b) for a, b in zip(*results, strict=True))
    assert (results[0][0] == 0).any() and torch.equal(cpu.dropout(x, 0.3, training=False), x)
    with pytest.raises(RuntimeError, match="contiguous float32"):
        native.bernoulli_(torch.empty(4, dtype=torch.float64), 0.5)
    assert cpu.bernoulli_(torch.empty(4, 2).T, 1.0).eq(1).all()  # not contiguous: torch's own call


@needs_build
def test_a_probability_outside_0_1_gets_torchs_error_and_leaves_the_generator_as_it_was():
    torch.manual_seed(0)
    before = torch.get_rng_state()
    for p in (-0.1, 1.5):
        with pytest.raises(RuntimeError, match="bernoulli"):
            native.bernoulli_(torch.empty(8), p)
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.parametrize("engine", [True, False])  # the kernels' draw, or torch's call then scaled
@pytest.mark.parametrize("n", [0, 3, 313, 5000])  # the kernels turn four elements at a time, the rest one by one
@pytest.mark.parametrize("keep", [0.8, 0.3, 0.77])
def test_dropouts_mask_is_torchs_scaled_mask_drawn_at_once(monkeypatch, engine, n, keep):
    """`keep_mask` gives the bits of torch's way, `bernoulli_(keep)` then divided by keep, the generator left where
    torch's leaves it, whether the kernels draw it (the scaled value written in the same pass) or torch does."""
    if engine and not cpu.compiled():
        pytest.skip("no C compiler here: the compiled kernels are not built")
    monkeypatch.setattr(cpu, "ENABLED", engine and cpu.ENABLED)
    draws = []
    for draw in (lambda out: out.bernoulli_(keep).div_(keep), lambda out: cpu.keep_mask(out, keep)):
        torch.manual_seed(7)
        torch.rand(5)  # a block of 624 words ends mid-element
        draws.append((draw(torch.empty(n)), torch.get_rng_state()))
    (theirs, their_state), (mask, state) = draws
    assert torch.equal(mask, theirs) and torch.equal(state, their_state)
    if n > 300:
        assert set(mask.unique().tolist()) == {0.0, torch.ones(()).div_(keep).item()}
