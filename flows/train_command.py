"""The training command's settings, apart from the flow so that a bad option is refused before Prefect is imported
or its temporary server started: every TrainConfig field as `--field value` (or RNNLM_FIELD), plus what to do."""

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from flows.cli import CommandSettings
from rnnlm.config import TrainConfig


class TrainCommand(CommandSettings, TrainConfig):
    """The command line: every TrainConfig field as `--field value`, plus what to do with it."""

    model_config = SettingsConfigDict(
        env_prefix="RNNLM_",  # an unrelated LR or SEED in the environment cannot change a run
        cli_prog_name="python flows/train_flow.py",
        cli_implicit_flags=True,
        extra="forbid",
    )

    serve: bool = Field(
        False,
        description="Instead of training once, create the deployment 'train-rnnlm/train-rnnlm' with these options as "
        "its parameters and run its scheduled and UI-triggered runs (needs PREFECT_API_URL; see flows/deploy.py).",
    )
    cron: str | None = Field(None, description="With --serve: a cron schedule for the deployment, e.g. '0 3 * * *'.")
    config_file: str | None = Field(
        None,
        description="A recipe: a TOML (or YAML) file of these options, e.g. recipes/word-lstm.toml; options given "
        "on the command line override it.",
    )

    def config(self) -> TrainConfig:
        """The training configuration given on the command line."""
        return TrainConfig(**self.model_dump(include=set(TrainConfig.model_fields)))
