#!/usr/bin/env bash
# Set up, lint, and run the whole test suite (stress and crash tests included).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev
# The power-loss test mounts a FUSE file system: libfuse3 and fusermount3 come
# from Debian's fuse3. Installed here when missing and we may; else it skips.
if ! command -v fusermount3 >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "== installing fuse3 (Debian) for the power-loss test"
  if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fuse3; } \
    >/tmp/mmcore-fuse3-install.log 2>&1; then
    echo "   could not install fuse3 (see /tmp/mmcore-fuse3-install.log): the power-loss test will skip"
  fi
fi
echo "== ruff"; .venv/bin/ruff check . && .venv/bin/ruff format --check .
echo "== mypy"; .venv/bin/mypy mmcore
echo "== clang-format"; .venv/bin/clang-format --dry-run --Werror csrc/*
echo "== pytest"
exec .venv/bin/pytest "$@"
