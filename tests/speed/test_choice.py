"""The engine's one-time measurements (`rnnlm.cpu.choice`): the quicker candidate is chosen, remembered on disk for
every later process, can be set by hand, and a run's records say which path trained it and why."""

import json
import os
import subprocess
import sys

import pytest
import torch
from helpers import PROJECT_ROOT

from rnnlm import cpu
from rnnlm.cpu import checks, choice, fused
from rnnlm.model import RNNLM


@pytest.fixture
def fresh(tmp_path, monkeypatch):
    """An empty choices file and no choice in memory or in the environment."""
    monkeypatch.setenv("RNNLM_KERNEL_CACHE", str(tmp_path))
    monkeypatch.delenv("RNNLM_CPU_CHOICE", raising=False)
    monkeypatch.setattr(choice, "_known", {})
    monkeypatch.setattr(choice, "decisions", {})
    monkeypatch.setattr(choice, "time", Clock)
    monkeypatch.setattr(choice, "_unrecorded", set())
    return tmp_path / "choices.json"


class Clock:
    """The measurement's clock (`time` as `choice` sees it) under the test's control: only the candidates move it."""

    now = 0.0

    @classmethod
    def perf_counter(cls) -> float:
        return cls.now


def counted(calls: list, name: str, seconds: float):
    """A candidate that records its calls and takes `seconds` by the test's clock."""

    def run():
        calls.append(name)
        Clock.now += seconds

    return run


def test_the_quicker_candidate_is_chosen_once_and_remembered(fresh):
    calls = []
    candidates = {"slow": counted(calls, "slow", 0.004), "quick": counted(calls, "quick", 0.0)}
    assert choice.fastest("demo:1x2", candidates) == "quick"
    assert calls.count("slow") == calls.count("quick") == choice.CALLS
    assert "quick (measured: slow" in choice.decisions["demo:1x2"]
    assert choice.fastest("demo:1x2", candidates) == "quick" and len(calls) == 2 * choice.CALLS  # not again
    recorded = json.loads(fresh.read_text())
    [key] = [key for key in recorded if not key.endswith(" times")]
    assert key.startswith("demo:1x2@") and recorded[key] == "quick"
    assert recorded[f"{key} times"].startswith("slow ") and " ms against quick " in recorded[f"{key} times"]
    choice._known.clear()  # as a later process: the choice and its times from the file, nothing measured again
    choice.decisions.clear()
    assert choice.fastest("demo:1x2", candidates) == "quick" and len(calls) == 2 * choice.CALLS
    assert choice.decisions["demo:1x2"] == f"quick (measured before on this machine: {recorded[f'{key} times']})"


def test_quick_candidates_are_timed_in_more_rounds_within_the_time_allowed(fresh):
    """Quick candidates are timed in MAX_ROUNDS rounds (on a machine whose speed wanders, more rounds pick the
    quicker one more surely); slow ones stop after ROUNDS once the measurement has taken SECONDS."""
    calls = []
    quick = {"one": counted(calls, "one", 0.010), "other": counted(calls, "other", 0.011)}
    assert choice.fastest("demo:quick", quick) == "one" and calls.count("other") == 2 * choice.MAX_ROUNDS
    calls.clear()
    each = choice.SECONDS / 4  # a round (two calls of each) takes the whole time allowed
    slow = {"one": counted(calls, "one", each * 1.1), "other": counted(calls, "other", each)}
    assert choice.fastest("demo:slow", slow) == "other" and calls.count("one") == 2 * choice.ROUNDS
    assert choice.ROUNDS < choice.MAX_ROUNDS


def test_measuring_leaves_the_runs_random_numbers_alone(fresh):
    """A choice measured in the middle of a run (its first minibatch) must not change what the run computes: the
    candidates' draws (a dropout model's masks) come from a forked generator."""
    torch.manual_seed(3)
    expected = torch.rand(4)
    torch.manual_seed(3)
    draws = {"one": lambda: torch.rand(1000), "other": lambda: torch.randn(1000)}
    choice.fastest("demo:rng", draws)
    assert torch.equal(torch.rand(4), expected)


def test_a_handicapped_candidate_is_taken_only_where_quicker_by_its_margin(fresh):
    """`handicap` multiplies a candidate's time before the comparison (amp's LSTM choice: the compiled float32
    recurrence must be 10% quicker than torch's bf16 one); the record keeps the times measured and says so."""
    calls = []
    close = {"compiled": counted(calls, "compiled", 0.0100), "torch": counted(calls, "torch", 0.0105)}
    assert choice.fastest("demo:close", close) == "compiled"
    assert choice.fastest("demo:close@bf16", close, handicap={"compiled": 1.1}) == "torch"
    assert choice.decisions["demo:close@bf16"] == (
        "torch (measured: compiled 10.00 ms against torch 10.50 ms, compiled's counted 1.1x)"
    )
    clear = {"compiled": counted(calls, "compiled", 0.0080), "torch": counted(calls, "torch", 0.0105)}
    assert choice.fastest("demo:clear@bf16", clear, handicap={"compiled": 1.1}) == "compiled"


def test_a_recorded_choice_wins_over_a_new_measurement(fresh):
    """What another process recorded first is what this one takes, so that every process computes the same."""
    calls = []
    candidates = {"slow": counted(calls, "slow", 0.004), "quick": counted(calls, "quick", 0.0)}
    choice.fastest("demo:3", candidates)
    known = json.loads(fresh.read_text())
    fresh.write_text(json.dumps({key: "slow" for key in known if not key.endswith(" times")}))  # measured otherwise
    choice._known.clear()
    assert choice.fastest("demo:3", candidates) == "slow"
    assert len(calls) == 2 * choice.CALLS  # read back: nothing measured again
    assert choice.decisions["demo:3"].startswith("quick")  # this process's first decision, before the file was read


def test_a_choice_can_be_set_by_hand(fresh, monkeypatch):
    monkeypatch.setitem(choice.KNOWN, "demo", ("slow", "quick"))
    monkeypatch.setenv("RNNLM_CPU_CHOICE", "demo=slow, lstm-step=torch")
    calls = []
    candidates = {"slow": counted(calls, "slow", 0.0), "quick": counted(calls, "quick", 0.0)}
    assert choice.fastest("demo:9", candidates) == "slow" and calls == []
    assert choice.decisions["demo:9"] == "slow (set by RNNLM_CPU_CHOICE)"
    assert not fresh.exists()


def test_the_run_records_which_path_trains_the_lstm_and_why(monkeypatch):
    """The engine's words for a run's records (log line, MLflow tag, Prefect report) say which LSTM path trains and
    the measurement that chose it."""
    if not cpu.compiled():
        pytest.skip("no compiled kernels here: the LSTM trains on torch's layers without a choice")
    window = (8, 10)
    monkeypatch.setattr(cpu, "lstm_path", lambda *size: "torch")
    assert not cpu.handles(RNNLM(9, 16, "lstm"), torch.zeros(window, dtype=torch.int64))
    assert cpu.engine_name(RNNLM(9, 16, "lstm"), window) == (
        "torch's layers (torch's LSTM measured quicker than the compiled one on this machine)"
    )
    assert cpu.threads_for(0, RNNLM(9, 16, "lstm"), window) == torch.get_num_threads()  # torch's layers: all
    decisions = {cpu._lstm_choice(RNNLM(9, 16, "lstm"), 8): "torch (measured: compiled 2.00 ms against torch 1.00 ms)"}
    monkeypatch.setattr(choice, "decisions", decisions)
    assert cpu.engine_name(RNNLM(9, 16, "lstm"), window) == (
        "torch's layers (torch's LSTM measured quicker than the compiled one on this machine (measured: compiled 2.00 "
        "ms against torch 1.00 ms))"
    )
    decisions[cpu._lstm_choice(RNNLM(9, 16, "lstm"), 8)] = "torch (set by RNNLM_CPU_CHOICE)"
    assert cpu.engine_name(RNNLM(9, 16, "lstm"), window) == (
        "torch's layers (torch's LSTM, set by RNNLM_CPU_CHOICE=lstm-step=torch)"  # not "measured quicker"
    )
    monkeypatch.setattr(cpu, "lstm_path", lambda *size: "compiled")
    decisions[cpu._lstm_choice(RNNLM(9, 16, "lstm"), 8)] = "compiled (measured before on this machine: ...)"
    assert cpu.engine_name(RNNLM(9, 16, "lstm"), window) == (
        f"compiled kernels ({cpu.native.instruction_set()}), {'two cores' if cpu.usable_cores() > 1 else 'one core'}; "
        "over torch's LSTM (measured before on this machine: ...)"
    )


@pytest.mark.parametrize(
    "variable, value",
    [
        ("RNNLM_CPU_CHOICE", "lstm-step=anything"),
        ("RNNLM_CPU_CHOICE", "lstm=torch"),
        ("RNNLM_CPU_CHOICE", "lstm-step"),
        ("RNNLM_NATIVE", "off"),
    ],
)
def test_unknown_values_of_the_engines_variables_are_refused_in_one_line(fresh, monkeypatch, variable, value):
    """Refused with the variable and the values it takes, as one `error:` line on the command line; never a
    silent choice (`lstm-step=<anything>` picked torch's LSTM)."""
    from flows.cli import run_command

    monkeypatch.setenv(variable, value)
    with pytest.raises(checks.EngineSettingError, match=variable) as raised:
        cpu.check_environment()
    accepted = "lstm-step=compiled|torch" if variable == "RNNLM_CPU_CHOICE" else "0 (the compiled kernels off)"
    assert accepted in str(raised.value)
    if variable == "RNNLM_CPU_CHOICE":  # where the engine reads it: the LSTM's path, also in the pure check
        with pytest.raises(checks.EngineSettingError, match=variable):
            cpu.lstm_path(RNNLM(9, 16, "lstm"), 8)
    with pytest.raises(SystemExit) as ended:
        run_command(cpu.check_environment)
    assert str(ended.value).startswith(f"error: {variable}") and "\n" not in str(ended.value)


def test_handles_never_measures_prepare_does_once_and_it_is_remembered(fresh, monkeypatch):
    """The pure check and the run's descriptions read the LSTM's choice; `prepare` (what `settings` calls when a run
    hands the model over) measures it once; a later process reads it from choices.json."""
    if not cpu.compiled():
        pytest.skip("no compiled kernels here: the LSTM trains on torch's layers without a choice")
    measured = []
    measure = choice._measure
    monkeypatch.setattr(choice, "_measure", lambda *args: measured.append(1) or measure(*args))
    model, window = RNNLM(9, 16, "lstm"), (4, 10)
    tokens = torch.zeros(window, dtype=torch.int64)
    assert not cpu.handles(model, tokens)
    assert cpu.why_not(model, tokens).startswith("the LSTM's path is not measured yet at this size")
    cpu.engine_name(model, window), cpu.device_name(model, 0, window), cpu.matmul_precision(model, True, window)
    assert measured == [] and not fresh.exists()
    with cpu.settings(0, model, window):
        chosen = cpu.lstm_path(model, window[0])
    assert measured == [1] and chosen in ("compiled", "torch")
    assert cpu.handles(model, tokens) == (chosen == "compiled")
    cpu.prepare(model, window)
    assert measured == [1]  # not again
    choice._known.clear()  # as a later process
    choice._unrecorded.clear()
    assert cpu.lstm_path(model, window[0]) == chosen and measured == [1]


def test_under_amp_the_lstms_path_is_measured_in_bf16_and_read_under_autocast(fresh):
    """With amp, torch's LSTM trains in bf16 (oneDNN) where the compiled one keeps a float32 recurrence, so the float32
    choice says nothing of amp's (on a 2-core Xeon a 2x512 LSTM trained 1.6x slower on the path float32 chose):
    `prepare` measures a second choice with each candidate's forward pass under CPU autocast, kept apart, which the
    forward pass under autocast, the thread count and the run's records read. Where bf16 is not quick, amp trains
    in float32 and shares the float32 choice."""
    if not cpu.compiled():
        pytest.skip("no compiled kernels here: the LSTM trains on torch's layers without a choice")
    model = RNNLM(40, 16, "lstm", 2, embedding_dim=16, tie_weights=True, adaptive_cutoffs=[10, 20])
    window, dtypes = (4, 10), []
    model.rnn.register_forward_hook(lambda module, inputs, outputs: dtypes.append(outputs[0].dtype))
    float32_key = cpu._lstm_choice(model, window[0])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16_key = cpu._lstm_choice(model, window[0])
    assert bf16_key == float32_key + "@bf16"

    cpu.prepare(model, window, amp=True)
    recorded = {key: value for key, value in json.loads(fresh.read_text()).items()
                if key.startswith("lstm-step:") and not key.endswith(" times")}  # fmt: skip
    float32_path = recorded[choice._key(float32_key, per_threads=False)]
    if not cpu.bf16_fast():
        assert len(recorded) == 1 and set(dtypes) == {torch.float32}
        assert cpu.engine_name(model, window, amp=True) == cpu.engine_name(model, window)
        return
    bf16_path = recorded[choice._key(bf16_key, per_threads=False)]
    assert len(recorded) == 2 and {torch.bfloat16, torch.float32} <= set(dtypes)  # torch's candidate in both
    with cpu.autocast(True):
        assert cpu.lstm_path(model, window[0]) == bf16_path
        assert cpu.handles(model, torch.zeros(window, dtype=torch.int64)) == (bf16_path == "compiled")
    assert cpu.lstm_path(model, window[0]) == float32_path  # outside autocast (evaluation): the float32 choice
    words = "compiled kernels" if bf16_path == "compiled" else "torch's layers"
    assert cpu.engine_name(model, window, amp=True).startswith(words)


@pytest.mark.slow
def test_an_unknown_lstm_choice_ends_the_command_with_one_error_line(tmp_path, small_corpus):
    """`RNNLM_CPU_CHOICE=lstm-step=<anything>` on the command line: status 1, one `error:` line, no traceback."""
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "PREFECT_HOME": str(tmp_path / "prefect"),
        "RNNLM_CACHE_DIR": str(tmp_path / "cache"),
        "RNNLM_CPU_CHOICE": "lstm-step=fast",
    }
    env.pop("PREFECT_API_URL", None)
    args = ["--rnn", "lstm", "--num_epochs", "1", "--val_tokens", "1000", "--test_tokens", "1000"]
    command = [sys.executable, "flows/train_flow.py", "--corpus", str(small_corpus), *args]
    done = subprocess.run(command, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 1
    last = (done.stdout + done.stderr).strip().splitlines()[-1]
    assert last.startswith("error: RNNLM_CPU_CHOICE: 'lstm-step=fast' is not a choice the engine takes (lstm-step=")
    assert "Traceback" not in done.stdout + done.stderr


def test_the_lstm_candidates_train_on_ids_that_fall_as_a_texts_words():
    """The one-time LSTM choice times each path on ids drawn by Zipf's law over frequency ranks (a vocabulary's
    order), so that an adaptive softmax's head takes most targets, as in training, not one in six as uniform ids."""
    torch.manual_seed(0)
    vocab = 12_000
    ids = fused.text_like_ids(vocab, (400, 500))
    assert ids.shape == (400, 500) and ids.dtype == torch.int64 and 0 <= ids.min() and ids.max() < vocab
    harmonic = (1.0 / torch.arange(1, vocab + 1, dtype=torch.float64)).cumsum(0)
    for rank in (1, 10, 2_000):  # the share of ids below each rank, as Zipf's law gives it
        assert abs((ids < rank).double().mean() - harmonic[rank - 1] / harmonic[-1]) < 0.01
    counts = torch.bincount(ids.flatten(), minlength=vocab)
    assert counts[0] > 1.8 * counts[1] and counts[1] > counts[100] > counts[5_000:].max()
