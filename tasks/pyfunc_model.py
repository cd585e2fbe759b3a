"""The registered model, written as an MLflow "model from code": a pyfunc that generates text.

MLflow copies this file into the model, together with the `rnnlm` package (code_paths) and the checkpoint
(artifacts), so a registered version carries weights, vocab, config and sampling code and needs nothing else.
Input: a list of prompts. Params: num_preds (default 50, at most 10,000), temperature (> 0), top_k (1 = greedy
argmax, the book's predict), seed. Output: one string per prompt, the prompt followed by its continuation.
"""

from __future__ import annotations

from typing import Any

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel


class RNNLMModel(PythonModel):
    """Generates continuations of prompts with a trained rnnlm checkpoint."""

    def load_context(self, context) -> None:
        from rnnlm.checkpoint import load_checkpoint, model_from_checkpoint

        self.model, self.vocab, self.config = model_from_checkpoint(load_checkpoint(context.artifacts["checkpoint"]))

    def predict(self, context, model_input: list[str], params: dict[str, Any] | None = None) -> list[str]:
        from rnnlm.generate import SAMPLING_DEFAULTS, GenerationError, generate

        options = {**SAMPLING_DEFAULTS, **{k: v for k, v in (params or {}).items() if v is not None}}
        prompts = list(model_input) if not isinstance(model_input, str) else [model_input]
        try:
            return generate(
                self.model,
                self.vocab,
                prompts,
                int(options["num_preds"]),
                self.config["tokenization"],
                temperature=float(options["temperature"]),
                top_k=int(options["top_k"]),
                seed=int(options["seed"]),
            )
        except GenerationError as err:  # a 400 from `mlflow models serve`, not a 500
            raise MlflowException(str(err), error_code=INVALID_PARAMETER_VALUE) from err


mlflow.models.set_model(RNNLMModel())
