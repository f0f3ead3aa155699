#!/usr/bin/env bash
# Install what the tests need (reusing .venv) and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --dev
.venv/bin/ruff check src tests benchmarks
.venv/bin/python -m pytest -q "$@"
