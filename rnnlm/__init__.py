"""rnnlm: D2L's recurrent language models (section 8.6) as a plain library; no orchestration or tracking here."""

__version__ = "0.1.0"
