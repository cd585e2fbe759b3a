"""The training command line as users meet it: scheduling options refused before anything starts, and a user's
mistake ending with one line that says what to do."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import PROJECT_ROOT, CountingHandler, small_text

from flows.train_flow import main


def test_cron_without_serve_is_refused():
    with pytest.raises(SystemExit, match="--cron schedules the deployment made by --serve"):
        main(["--cron", "0 3 * * *"])


def test_compare_cli_refuses_a_negative_margin():
    from flows.compare_flow import main as compare_main

    with pytest.raises(SystemExit, match="--promote_margin"):
        compare_main(["--promote_margin", "-0.1"])


def _script(tmp_path, *args: str, **variables: str) -> subprocess.CompletedProcess:
    """`python flows/train_flow.py ARGS` as a user runs it, with a private MLflow store and Prefect home (and
    `variables` in its environment)."""
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("RNNLM_")},
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "PREFECT_HOME": str(tmp_path / "prefect"),
        "RNNLM_CACHE_DIR": str(tmp_path / "cache"),
        **variables,
    }
    env.pop("PREFECT_API_URL", None)
    command = [sys.executable, "flows/train_flow.py", *args]
    return subprocess.run(command, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_a_folder_as_corpus_ends_with_one_line_saying_so(tmp_path):
    done = _script(tmp_path, "--corpus", str(tmp_path), "--num_epochs", "1")
    output = (done.stdout + done.stderr).strip().splitlines()
    assert done.returncode == 1
    assert output[-1] == f"error: corpus '{tmp_path}' is a folder; give the path of a text file (or an http(s) URL)"
    assert len(output) <= 3 and "Traceback" not in done.stderr  # at most Prefect's server goodbye before it
    assert not (tmp_path / "mlflow.db").exists()  # refused before MLflow was touched


@pytest.mark.slow
def test_a_corpus_too_short_fails_in_the_flow_without_tracebacks(tmp_path):
    corpus = tmp_path / "tiny.txt"
    corpus.write_text("far too short\n")
    done = _script(tmp_path, "--corpus", str(corpus), "--val_tokens", "0", "--num_epochs", "1")
    assert done.returncode == 1
    last = (done.stdout + done.stderr).strip().splitlines()[-1]
    assert last.startswith("error: the corpus gives 13 training tokens, fewer than the 1,156 needed")
    assert "Traceback" not in done.stdout + done.stderr


@pytest.mark.parametrize(
    "options, names",
    [
        (["--tie_weights", "--embedding_dim", "64"], ["tie_weights", "embedding_dim 256"]),
        (["--early_stopping", "3", "--val_tokens", "0"], ["early_stopping", "--val_tokens"]),
        (["--adaptive_cutoffs", "50,20"], ["adaptive_cutoffs must be word ranks rising", "[50, 20]"]),
    ],
)
def test_options_that_cannot_work_together_end_before_any_download(tmp_path, corpus_url, options, names):
    done = _script(tmp_path, "--corpus", corpus_url, *options)
    last = (done.stdout + done.stderr).strip().splitlines()[-1]
    assert done.returncode == 1 and last.startswith("error: ") and all(name in last for name in names)
    assert "--:" not in last and "Value error" not in last and "Exception in thread" not in done.stderr
    assert CountingHandler.requests_seen == [] and not (tmp_path / "mlflow.db").exists()


def test_held_out_tokens_beyond_a_local_corpus_end_before_anything_starts(tmp_path):
    corpus = tmp_path / "short.txt"
    corpus.write_text(small_text(300))
    done = _script(tmp_path, "--corpus", str(corpus), "--tokenization", "word", "--test_tokens", "5000")
    output = (done.stdout + done.stderr).strip().splitlines()
    assert done.returncode == 1 and len(output) <= 3 and "Traceback" not in done.stderr
    assert output[-1].startswith("error: val_tokens=10,000 and test_tokens=5,000 hold out more tokens than")
    assert "--test_tokens" in output[-1] and not (tmp_path / "mlflow.db").exists()


def test_a_recipe_file_sets_options_and_the_command_line_overrides_it(tmp_path):
    from flows.cli import parse_command
    from flows.train_flow import TrainCommand
    from rnnlm.config import TrainConfig

    recipe = PROJECT_ROOT / "recipes" / "word-lstm.toml"
    command = parse_command(TrainCommand, ["--config_file", str(recipe), "--lr", "5", "--corpus", "my.txt"])
    config = command.config()
    assert (config.rnn, config.num_layers, config.embedding_dim, config.dropout) == ("lstm", 2, 200, 0.2)
    assert (config.lr, config.corpus, config.lr_schedule) == (5.0, "my.txt", "plateau")
    assert config == TrainConfig.from_recipe(recipe, lr=5.0, corpus="my.txt")
    book = parse_command(TrainCommand, [f"--config_file={PROJECT_ROOT / 'recipes' / 'book.toml'}"]).config()
    assert book == TrainConfig()  # the book's recipe is the defaults, written out


@pytest.mark.parametrize(
    "text, message",
    [
        ("rnn = 'lstm'\nlayers = 2\n", "names options that do not exist: layers"),
        ("rnn = lstm\n", "is not valid TOML"),
        ("num_hiddens = -3\n", "--num_hiddens: Input should be greater than 0"),
    ],
)
def test_a_bad_recipe_ends_with_one_line_naming_the_problem(tmp_path, text, message):
    from flows.cli import parse_command
    from flows.train_flow import TrainCommand

    recipe = tmp_path / "bad.toml"
    recipe.write_text(text)
    with pytest.raises(SystemExit) as ended:
        parse_command(TrainCommand, ["--config_file", str(recipe)])
    assert str(ended.value).startswith("error: ") and message in str(ended.value)


# Each way a setting arrives, with a value that cannot work: the options, the environment, a recipe file (name, text)
# or None, and the one line the command ends with; "{recipe}" stands for the recipe's path
BAD_SETTINGS = {
    "list-in-environment": (
        [], {"RNNLM_ADAPTIVE_CUTOFFS": "2000,x"}, None,
        "error: RNNLM_ADAPTIVE_CUTOFFS (item 1): Input should be a valid integer, unable to parse string as an "
        "integer (see --help)",
    ),
    "list-in-environment-read-as-a-list": (
        [], {"RNNLM_ADAPTIVE_CUTOFFS": "6000,2000"}, None,
        "error: adaptive_cutoffs must be word ranks rising strictly from 1 or more (now [6000, 2000]), e.g. "
        "2000,6000 (see --help)",
    ),
    "config-file-in-environment-is-read": (
        [], {"RNNLM_CONFIG_FILE": "{recipe}"}, ("r.toml", "rnn = 'lstm'\nlr = inf\n"),
        "error: --lr: Input should be a finite number (see --help)",
    ),
    "config-file-in-environment-missing": (
        [], {"RNNLM_CONFIG_FILE": "/nonexistent/r.toml"}, None,
        "error: RNNLM_CONFIG_FILE: cannot read the recipe /nonexistent/r.toml: [Errno 2] No such file or "
        "directory: '/nonexistent/r.toml'",
    ),
    "yaml-number-key": (
        ["--config_file", "{recipe}"], {}, ("r.yaml", "rnn: gru\n1: 2\n"),
        "error: --config_file: {recipe} has keys that are not option names: 1",
    ),
    "yaml-null-key": (
        ["--config_file", "{recipe}"], {}, ("r.yaml", "null: lstm\n"),
        "error: --config_file: {recipe} has keys that are not option names: None",
    ),
    "boolean-as-number": (
        ["--config_file", "{recipe}"], {}, ("r.yaml", "num_hiddens: true\n"),
        "error: --num_hiddens: num_hiddens takes numbers, not true or false (see --help)",
    ),
    "lr-inf": (["--lr", "inf"], {}, None, "error: --lr: Input should be a finite number (see --help)"),
    "grad_clip-nan": (
        ["--grad_clip", "nan"], {}, None, "error: --grad_clip: Input should be a finite number (see --help)"
    ),
    "weight_decay-inf": (
        ["--weight_decay", "inf"], {}, None, "error: --weight_decay: Input should be a finite number (see --help)"
    ),
    "max_download_mb-inf-in-environment": (
        [], {"RNNLM_MAX_DOWNLOAD_MB": "inf"}, None,
        "error: RNNLM_MAX_DOWNLOAD_MB: Input should be a finite number (see --help)",
    ),
    "engine-choice-unknown": (
        [], {"RNNLM_CPU_CHOICE": "lstm-step=fast"}, None,
        "error: RNNLM_CPU_CHOICE: 'lstm-step=fast' is not a choice the engine takes",
    ),
    "engine-native-unknown": ([], {"RNNLM_NATIVE": "maybe"}, None, "error: RNNLM_NATIVE='maybe' is not one of 0"),
    "download_deadline-nan": (
        ["--download_deadline", "nan"], {}, None,
        "error: --download_deadline: Input should be a finite number (see --help)",
    ),
}  # fmt: skip


@pytest.mark.parametrize("options, variables, recipe, line", BAD_SETTINGS.values(), ids=BAD_SETTINGS.keys())
def test_a_bad_setting_from_anywhere_ends_with_one_line_before_anything_starts(
    tmp_path, corpus_url, options, variables, recipe, line
):
    path = str(tmp_path / (recipe[0] if recipe else "none"))
    if recipe:
        Path(path).write_text(recipe[1])
    options = [option.replace("{recipe}", path) for option in options]
    variables = {name: value.replace("{recipe}", path) for name, value in variables.items()}
    done = _script(tmp_path, "--corpus", corpus_url, *options, **variables)
    output = (done.stdout + done.stderr).strip().splitlines()
    assert done.returncode == 1 and len(output) == 1 and output[0].startswith(line.replace("{recipe}", path))
    assert CountingHandler.requests_seen == []  # nothing downloaded ...
    assert not (tmp_path / "prefect").exists() and not (tmp_path / "mlflow.db").exists()  # ... or started


def test_the_former_name_register_is_taken_with_one_note(tmp_path, corpus_url):
    done = _script(tmp_path, "--corpus", corpus_url, "--register", "last", "--lr", "-1")
    output = (done.stdout + done.stderr).strip().splitlines()
    assert done.returncode == 1 and output == [
        "note: options renamed (register is now register_weights); the former names still work",
        "error: --lr: Input should be greater than 0 (see --help)",
    ]


def test_bpe_without_held_out_text_is_refused_naming_the_option():
    with pytest.raises(SystemExit, match=r"^error: tokenization bpe learns its tokens .* add --held_out bytes"):
        main(["--tokenization", "bpe"])


def test_the_evaluate_cli_refuses_a_missing_text_in_one_line(tmp_path, capsys):
    from flows.evaluate_flow import main as evaluate_main

    with pytest.raises(SystemExit) as exit_info:
        evaluate_main(["--text", str(tmp_path / "missing.txt"), "--models", "rnnlm@champion", "rnnlm/2"])
    message = str(exit_info.value) + capsys.readouterr().err
    assert "missing.txt" in message and "does not exist" in message
