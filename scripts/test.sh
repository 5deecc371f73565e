#!/usr/bin/env bash
# Set up, lint, and run the whole test suite (stress and crash tests included).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev
echo "== ruff"; .venv/bin/ruff check . && .venv/bin/ruff format --check .
echo "== mypy"; .venv/bin/mypy mmcore
echo "== clang-format"; .venv/bin/clang-format --dry-run --Werror csrc/*
echo "== pytest"
exec .venv/bin/pytest "$@"
