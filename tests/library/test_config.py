"""The one configuration: book defaults, validation before any work, and the CLI generated from it."""

import pytest
from helpers import PROJECT_ROOT
from pydantic import ValidationError

from flows.train_flow import TrainCommand, main
from rnnlm.config import TIME_MACHINE_SHA1, TIME_MACHINE_URL, TrainConfig


def test_defaults_are_the_books_experiment():
    c = TrainConfig()
    assert (c.corpus, c.expected_sha1()) == (TIME_MACHINE_URL, TIME_MACHINE_SHA1)
    assert (c.tokenization, c.preprocess, c.max_tokens) == ("char", "book", 10_000)
    assert (c.batch_size, c.num_steps, c.num_hiddens, c.rnn, c.num_layers) == (32, 35, 256, "rnn", 1)
    assert (c.lr, c.grad_clip, c.num_epochs, c.use_random_iter) == (1.0, 1.0, 500, False)


@pytest.mark.parametrize(
    "field, value",
    [
        ("num_hiddens", 0),
        ("num_hiddens", -3),
        ("num_hiddens", 10**9),
        ("num_layers", 0),
        ("batch_size", 0),
        ("num_steps", -1),
        ("num_epochs", 0),
        ("lr", 0),
        ("lr", -1.0),
        ("rnn", "transformer"),
        ("tokenization", "bpe"),
        ("max_tokens", 0),
        ("corpus", "ftp://example.org/book.txt"),
        ("corpus_sha1", "not-a-sha"),
        ("num_epochs", -5),
        ("num_epochs", 10**9),
        ("num_layers", 10**6),
        ("batch_size", 10**9),
        ("num_steps", 0),
        ("num_steps", 10**9),
        ("num_preds", -1),
        ("num_preds", 10**6),
        ("checkpoint_every", 0),
        ("resume", "sometimes"),
        ("download_timeout", 0),
        ("max_download_mb", -1),
    ],
)
def test_bad_values_are_refused_with_the_field_named(field, value):
    with pytest.raises(ValidationError) as err:
        TrainConfig(**{field: value})
    assert field in str(err.value)


def test_cli_is_generated_from_the_config():
    command = TrainCommand(_cli_parse_args=["--num_epochs", "7", "--rnn", "gru", "--use_random_iter"])
    config = command.config()
    assert (config.num_epochs, config.rnn, config.use_random_iter) == (7, "gru", True)
    assert config.model_dump().keys() == TrainConfig().model_dump().keys()


def test_help_lists_every_option_with_its_meaning(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    for name, field in TrainConfig.model_fields.items():
        assert f"--{name}" in text
        assert field.description.split()[0] in text


def test_cli_rejects_bad_values_before_any_work(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--num_hiddens", "0", "--corpus", "/nonexistent/file.txt"])
    assert "--num_hiddens" in str(exit_info.value.code) and "greater than 0" in str(exit_info.value.code)


def test_environment_needs_the_prefix(monkeypatch):
    monkeypatch.setenv("LR", "5")
    monkeypatch.setenv("RNNLM_NUM_EPOCHS", "3")
    config = TrainCommand(_cli_parse_args=[]).config()
    assert (config.lr, config.num_epochs) == (1.0, 3)


@pytest.mark.parametrize("recipe", sorted((PROJECT_ROOT / "recipes").glob("*.toml")), ids=lambda path: path.name)
def test_every_shipped_recipe_is_a_valid_config(recipe):
    config = TrainConfig.from_recipe(recipe)
    assert config != TrainConfig() or recipe.name == "book.toml"  # each but the book's changes something
