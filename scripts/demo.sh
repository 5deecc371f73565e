#!/usr/bin/env bash
# The main job: set up, then save and recover the battery model set into an
# embedded store and compare with torch.save, safetensors and raw bytes, all
# measured in one process (python -m benchmarks.demo: `mmcore demo`, which needs
# only mmcore's own dependencies, with the safetensors rows of the bench extras).
# Extra arguments go to the demo (e.g. --cells 2000 --no-compare, --repeat 5).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh bench
exec .venv/bin/python -m benchmarks.demo "$@"
