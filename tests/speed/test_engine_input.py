"""Bad input to the engine's entries raises the error torch's own layers raise for it, before any C call, and never
takes the process down: each case runs in a child process (a crash would end it, not pytest), with and without
`python -O` (which strips `assert`s)."""

import json
import subprocess
import sys

import pytest

from rnnlm.cpu import native

needs_build = pytest.mark.skipif(native.library() is None, reason="no C compiler here: the kernels are not built")

# One bad input, given to the engine's entries and to torch's own layers; prints a JSON line per entry.
_CASE = """
import json, sys, torch
import torch.nn.functional as F
from rnnlm import cpu
from rnnlm.cpu import fused
from rnnlm.model import RNNLM

case = sys.argv[1]
torch.manual_seed(0)
vocab, batch, steps = 5, 2, 9
tokens, targets = torch.randint(0, vocab, (batch, steps)), torch.randint(0, vocab, (batch, steps))
rnn, lstm = RNNLM(vocab, 8, "rnn"), RNNLM(vocab, 8, "lstm")
state = {id(rnn): rnn.begin_state(batch), id(lstm): lstm.begin_state(batch)}
if case == "id-out-of-range":
    tokens[0, 3] = vocab
elif case == "negative-id":
    tokens[1, 2] = -3
elif case == "target-out-of-range":
    targets[1, 4] = vocab + 2
elif case == "int32-tokens":
    tokens = tokens.int()
elif case == "non-contiguous":
    tokens = torch.randint(0, vocab, (steps, batch)).T  # (batch, steps), a transposed view
    for model in (rnn, lstm):
        model.rnn.weight_hh_l0 = torch.nn.Parameter(model.rnn.weight_hh_l0.detach().T.contiguous().T)
        model.linear.bias = torch.nn.Parameter(torch.randn(2 * vocab)[::2])
elif case == "wrong-state-shape":
    state = {id(rnn): rnn.begin_state(batch + 1), id(lstm): lstm.begin_state(batch + 1)}
elif case == "wrong-targets-shape":
    targets = targets[:, :4]


def torch_loss(model):
    logits, _ = model.forward_torch(tokens, state[id(model)])
    return F.cross_entropy(logits, targets.T.reshape(-1))


h_rnn, h_lstm = state[id(rnn)], state[id(lstm)]
entries = {  # the engine's entry, and torch's layers on the same input
    "forward": (lambda: cpu.forward(rnn, tokens, h_rnn)[0].sum(), lambda: rnn.forward_torch(tokens, h_rnn)[0].sum()),
    "loss": (lambda: cpu.loss(rnn, tokens, targets, h_rnn)[0], lambda: torch_loss(rnn)),
    "float32-step": (lambda: fused.float32_step(rnn, tokens, targets, h_rnn, 0.0, 1.0)[0], lambda: torch_loss(rnn)),
    "bf16-step": (lambda: fused.sgd_step(lstm, tokens, targets, h_lstm, 0.0, 1.0)[0], lambda: torch_loss(lstm)),
}


def outcome(run):
    try:
        value = run()
        if value.requires_grad:
            value.backward()
        return {"value": float(value.detach())}
    except Exception as exc:
        return {"error": [cls.__name__ for cls in type(exc).__mro__], "message": str(exc)}


for name, (engine, torch_layers) in entries.items():
    print(json.dumps({"entry": name, "engine": outcome(engine), "torch": outcome(torch_layers)}), flush=True)
"""

ENTRIES = ["forward", "loss", "float32-step", "bf16-step"]


def run_case(case: str, optimize: bool) -> dict[str, dict]:
    """The case's outcome for each entry, from a child process (the engine's and torch's layers')."""
    command = [sys.executable, *(["-O"] if optimize else []), "-c", _CASE, case]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"the process ended with {done.returncode}: {done.stderr[-2000:]}"
    results = {line["entry"]: line for line in map(json.loads, done.stdout.splitlines())}
    assert list(results) == ENTRIES
    return results


def assert_raised_as_torch(result: dict, named: str) -> None:
    """The engine raised what torch's layers raised (the class, or a subclass of it), naming the tensor."""
    engine, torch_layers = result["engine"], result["torch"]
    assert "error" in torch_layers, f"torch's layers took this input: {result}"
    assert "error" in engine, f"the engine took what torch's layers refuse: {result}"
    assert torch_layers["error"][0] in engine["error"], result
    assert named in engine["message"], result


optimized = pytest.mark.parametrize("optimize", [False, True], ids=["python", "python -O"])


@needs_build
@optimized
@pytest.mark.parametrize("case", ["id-out-of-range", "negative-id"])
def test_an_id_outside_the_vocabulary_raises_index_error(case, optimize):
    for entry, result in run_case(case, optimize).items():
        assert_raised_as_torch(result, "tokens")
        assert "IndexError" in result["engine"]["error"], entry  # as nn.Embedding raises for it


@needs_build
@optimized
def test_a_target_outside_the_vocabulary_raises_index_error(optimize):
    results = run_case("target-out-of-range", optimize)
    assert results["loss"]["torch"]["error"][0] == "IndexError"  # cross_entropy's
    for entry in ("loss", "float32-step", "bf16-step"):
        assert_raised_as_torch(results[entry], "Target 7")


@needs_build
@optimized
def test_int32_tokens_raise_as_torchs_one_hot_does(optimize):
    for result in run_case("int32-tokens", optimize).values():
        assert_raised_as_torch(result, "tokens")
        assert "int64" in result["engine"]["message"]


@needs_build
@optimized
def test_non_contiguous_tensors_give_torchs_results_or_are_refused_by_the_in_place_step(optimize):
    """Tokens and parameters that are views: forward and loss compute torch's results; the whole steps, which update
    the parameters in place where C sees them, refuse them by name (the trainer then takes the autograd step)."""
    results = run_case("non-contiguous", optimize)
    for entry in ("forward", "loss"):
        engine, torch_layers = results[entry]["engine"], results[entry]["torch"]
        assert "value" in engine, results[entry]
        assert engine["value"] == pytest.approx(torch_layers["value"], rel=1e-5, abs=1e-5)
    for entry in ("float32-step", "bf16-step"):
        engine = results[entry]["engine"]
        assert "RuntimeError" in engine.get("error", []), results[entry]
        assert "rnn.weight_hh_l0 must be a contiguous float32 tensor" in engine["message"]


@needs_build
@optimized
@pytest.mark.parametrize("case", ["wrong-state-shape", "wrong-targets-shape"])
def test_a_wrong_shape_raises_torchs_error(case, optimize):
    for entry, result in run_case(case, optimize).items():
        if case == "wrong-targets-shape" and entry == "forward":
            assert "value" in result["engine"]  # the forward takes no targets
            continue
        assert_raised_as_torch(result, "hidden" if case == "wrong-state-shape" else "targets")
