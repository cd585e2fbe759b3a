"""A small model logged as the project's served pyfunc, for the tests of serving without training one."""

from __future__ import annotations

from pathlib import Path

import torch

from rnnlm.model import RNNLM
from rnnlm.tokens import Vocab

VOCAB = Vocab(["<unk>", " ", *"etaoinsrhldmucfwgypbvkxjqz"])
MODEL_SCRIPT = Path(__file__).resolve().parents[2] / "serving" / "model.py"


def logged_model(folder: Path) -> str:
    """A small book-style model logged as the project's pyfunc in `folder`/logged (with `rnnlm` and `serving` as
    its code, as `register_model` logs it); its path."""
    import mlflow

    from rnnlm import paths
    from rnnlm.checkpoint import save_checkpoint
    from rnnlm.config import TrainConfig
    from rnnlm.generate import SAMPLING_DEFAULTS

    torch.manual_seed(0)
    model = RNNLM(len(VOCAB), 8, "rnn")
    checkpoint = folder / "model.pt"
    config = TrainConfig(num_hiddens=8).model_dump(mode="json")
    save_checkpoint(checkpoint, model=model.state_dict(), config=config, vocab=VOCAB.tokens)
    path = folder / "logged"
    mlflow.pyfunc.save_model(
        path, python_model=str(MODEL_SCRIPT), artifacts={"checkpoint": str(checkpoint)},
        code_paths=[str(paths.PACKAGE), str(MODEL_SCRIPT.parent)], input_example=(["time"], SAMPLING_DEFAULTS),
    )  # fmt: skip
    return str(path)
