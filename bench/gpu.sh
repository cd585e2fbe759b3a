#!/usr/bin/env bash
# The GPU checks in one go (under 5 minutes on one H200): the tests marked `gpu`, then the training benchmark on the
# GPU, both loops side by side: the book's experiment for the full 500 epochs (float32, then bf16 autocast), GRU and
# LSTM for 100 epochs. Run from a fresh clone after the README's set-up, with a CUDA build of torch:
#   bash bench/gpu.sh 2>&1 | tee gpu-results.txt
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the library from this tree, installed or not
date -u
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
$PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA device visible to torch'; print(torch.__version__)"
timeout 90 $PY -m pytest -q -m gpu tests/speed/test_gpu.py
timeout 90 $PY bench/train_speed.py --device cuda --rnn rnn
timeout 60 $PY bench/train_speed.py --device cuda --rnn rnn --amp --epochs 200
timeout 60 $PY bench/train_speed.py --device cuda --rnn gru lstm --epochs 100
