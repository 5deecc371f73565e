#!/usr/bin/env bash
# One GPU check, in one call: build mmcore with the CUDA kernels, run the GPU
# tests, the kernel benchmark and the battery benchmark with the set on the
# GPU; logs and JSON go under $OUT (./gpu_out when unset). Budget: under
# 6 minutes on an H100.
#
# Made for a GPU machine with no network whose python3 already has torch,
# scikit-build-core, pybind11, msgpack, tqdm, pytest, hypothesis, safetensors
# and numpy (the lent H100/H200 image). rocksdict and blake3 are installed from
# wheels in ./.whl (no index is reached). Prepare them here first:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl rocksdict blake3
# and carry `.whl` with the call. MMCORE_WHEEL=path installs a wheel built
# elsewhere instead of building here (say which in RESULTS.md).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
OUT="${OUT:-$ROOT/gpu_out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
log() { echo "== $*" | tee -a "$OUT/summary.txt"; }
start=$(date +%s)
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; nvcc --version | tail -2; } \
  >"$OUT/gpu.txt" 2>&1
log "GPU: $(sed -n 2p "$OUT/gpu.txt")"
export PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
SITE="$OUT/site"
if [ -d .whl ]; then
  "$PY" -m pip install -q --no-index --no-deps --target "$SITE" .whl/*.whl >"$OUT/deps.log" 2>&1
  log "carried wheels: rc=$?"
fi
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
if [ -n "${MMCORE_WHEEL:-}" ]; then
  "$PY" -m pip install -q --no-index --no-deps --target "$SITE" "$MMCORE_WHEEL" >"$OUT/build.log" 2>&1
else
  export PATH="/usr/local/cuda/bin:$PATH"
  MMCORE_CUDA=ON "$PY" -m pip install -q --no-build-isolation --no-deps --target "$SITE" . \
    >"$OUT/build.log" 2>&1
fi
log "install: rc=$? after $(( $(date +%s) - start )) s"
cd "$OUT"  # import the installed package, not the source tree
"$PY" -c "import mmcore, torch; print('cuda_available', mmcore.cuda_available(), torch.cuda.get_device_name())" \
  2>&1 | tee -a "$OUT/summary.txt"
timeout 150 "$PY" -m pytest -q -rs -p no:cacheprovider -o addopts="" -m gpu "$ROOT/tests" \
  >"$OUT/gpu_tests.log" 2>&1
log "gpu tests: rc=$? ($(tail -1 "$OUT/gpu_tests.log"))"
timeout 120 "$PY" "$ROOT/benchmarks/bench_kernels.py" --json "$OUT/kernels.json" >"$OUT/kernels.txt" 2>&1
log "bench_kernels: rc=$?"
timeout 120 "$PY" "$ROOT/benchmarks/battery.py" --cells 10000 --device cuda \
  --methods raw,mmcore,safetensors-set --json "$OUT/battery.json" >"$OUT/battery.txt" 2>&1
log "battery (set on the GPU): rc=$?"
cat "$OUT/kernels.txt" "$OUT/battery.txt" >>"$OUT/summary.txt" 2>/dev/null
log "done after $(( $(date +%s) - start )) s"
