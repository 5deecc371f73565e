#!/usr/bin/env bash
# The main job: set up, then save and recover the battery model set into an
# embedded store and compare with torch.save / safetensors / raw bytes.
# Extra arguments go to `mmcore demo` (e.g. --cells 2000 --no-compare).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh bench
exec .venv/bin/mmcore demo "$@"
