"""The one configuration: book defaults, validation before any work, and the CLI generated from it."""

from typing import Literal

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


# --- every way a setting arrives: honoured, or refused naming it ---------------------------------------------------

FLOAT_FIELDS = [name for name, field in TrainConfig.model_fields.items() if field.annotation is float]
NUMBER_FIELDS = [name for name, field in TrainConfig.model_fields.items() if field.annotation in (int, float)]


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan"), "inf", "nan"])
@pytest.mark.parametrize("field", FLOAT_FIELDS)
def test_no_float_field_takes_a_non_finite_number(field, value):
    with pytest.raises(ValidationError, match=f"{field}\n  Input should be a finite number"):
        TrainConfig(**{field: value})


@pytest.mark.parametrize("value", [True, False])
@pytest.mark.parametrize("field", NUMBER_FIELDS)
def test_no_number_field_takes_a_boolean(field, value):
    with pytest.raises(ValidationError, match=f"{field} takes numbers, not true or false"):
        TrainConfig(**{field: value})


def test_numbers_still_come_as_text_from_the_command_line_and_the_environment():
    config = TrainConfig(num_hiddens="64", lr="0.5", adaptive_cutoffs=["2", "6"])
    assert (config.num_hiddens, config.lr, config.adaptive_cutoffs) == (64, 0.5, [2, 6])
    with pytest.raises(ValidationError, match="adaptive_cutoffs takes numbers"):
        TrainConfig(adaptive_cutoffs=[2, True])


def test_register_is_the_former_name_of_register_weights():
    assert TrainConfig(register="last").register_weights == "last"  # recipes, checkpoints, old deployments
    assert TrainConfig(register="last", register_weights="last").register_weights == "last"
    with pytest.raises(ValidationError, match="register is the former name of register_weights"):
        TrainConfig(register="last", register_weights="best")
    assert "register" not in TrainConfig().model_dump()  # the MLflow params and checkpoints carry the new name


@pytest.mark.parametrize("text, key", [("1: 2\n", "1"), ("null: lstm\n", "None"), ("rnn: gru\n3.5: x\n", "3.5")])
def test_a_recipe_key_that_is_not_a_string_is_refused_by_name(tmp_path, text, key):
    from rnnlm.config import RecipeError, read_recipe

    recipe = tmp_path / "odd.yaml"
    recipe.write_text(text)
    with pytest.raises(RecipeError, match=f"has keys that are not option names: {key}$"):
        read_recipe(recipe)


def test_every_list_field_reads_the_command_line_syntax_from_the_environment(monkeypatch):
    from flows.cli import parse_command

    fields = TrainConfig.model_fields.items()
    lists = [name for name, field in fields if getattr(field.annotation, "__origin__", None) is list]
    assert lists == ["adaptive_cutoffs"]  # a new list field: add it below
    for text in ("2000,6000", "[2000, 6000]", " 2000 , 6000 "):
        monkeypatch.setenv("RNNLM_ADAPTIVE_CUTOFFS", text)
        assert parse_command(TrainCommand, []).config().adaptive_cutoffs == [2000, 6000]


def test_rnnlm_config_file_is_read_and_the_command_line_still_wins(monkeypatch):
    from flows.cli import parse_command

    recipe = PROJECT_ROOT / "recipes" / "word-lstm.toml"
    monkeypatch.setenv("RNNLM_CONFIG_FILE", str(recipe))
    assert parse_command(TrainCommand, []).config() == TrainConfig.from_recipe(recipe)
    assert parse_command(TrainCommand, ["--lr", "5"]).config() == TrainConfig.from_recipe(recipe, lr=5.0)


@pytest.mark.parametrize(
    "argv, env",
    [(["--register", "last"], {}), (["--register=last"], {}), ([], {"RNNLM_REGISTER": "last"})],
    ids=["option", "option=", "environment"],
)
def test_the_former_name_register_still_works_with_one_note(monkeypatch, capsys, argv, env):
    from flows.cli import parse_command

    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert parse_command(TrainCommand, argv).config().register_weights == "last"
    notes = capsys.readouterr().err.strip().splitlines()
    assert notes == ["note: options renamed (register is now register_weights); the former names still work"]


def _another_value(name: str, field) -> tuple[str, object]:
    """A valid value for `name` other than its default: as the environment writes it, and as the config holds it."""
    default, kind = field.default, field.annotation
    if getattr(kind, "__origin__", None) is Literal:
        choice = next(c for c in kind.__args__ if c != default)
        return choice, choice
    if kind is bool:
        return str(not default).lower(), not default
    if kind is int:
        return str(default + 1), default + 1
    if kind is float:
        return str(default + 0.5), default + 0.5
    if kind == list[int]:
        return "3,5", [3, 5]
    text = "ab" * 20 if name == "corpus_sha1" else f"/tmp/{name}"  # the sha1: 40 hexadecimal characters
    return text, text


@pytest.mark.parametrize("name", TrainConfig.model_fields)
def test_every_option_can_come_from_the_environment(monkeypatch, name):
    from flows.cli import parse_command

    text, value = _another_value(name, TrainConfig.model_fields[name])
    monkeypatch.setenv(f"RNNLM_{name.upper()}", text)
    if name == "tie_weights":
        monkeypatch.setenv("RNNLM_EMBEDDING_DIM", "256")  # tying needs an embedding as wide as the hidden state
    if name == "locked_dropout":
        monkeypatch.setenv("RNNLM_DROPOUT", "0.5")  # locked dropout shares dropout's masks across time steps
    assert getattr(parse_command(TrainCommand, []).config(), name) == value
