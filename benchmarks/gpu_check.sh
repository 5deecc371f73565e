#!/usr/bin/env bash
# One GPU check, for a machine with a CUDA GPU and nothing of this project
# installed: build with the CUDA kernels, run the GPU tests, the kernel
# benchmark and the battery benchmark, and leave logs and JSON under $OUT
# (./gpu_out when unset). Budget: under 6 minutes on an H100.
#   MMCORE_WHEEL=path/to/mmcore-*.whl   install a wheel built elsewhere instead of building here
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_out}"
mkdir -p "$OUT"
log() { echo "== $*" | tee -a "$OUT/summary.txt"; }
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; nvcc --version | tail -2; } \
  > "$OUT/gpu.txt" 2>&1
log "GPU: $(head -2 "$OUT/gpu.txt" | tail -1)"
python3 -m venv "$OUT/venv" >/dev/null
PY="$OUT/venv/bin/python"
"$PY" -m pip install -q --upgrade pip >/dev/null 2>&1
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install -q torch >"$OUT/pip_torch.log" 2>&1 || log "torch install failed (see pip_torch.log)"
fi
start=$(date +%s)
if [ -n "${MMCORE_WHEEL:-}" ]; then
  "$PY" -m pip install -q "$MMCORE_WHEEL" "pytest>=8" hypothesis blake3 safetensors numpy >"$OUT/build.log" 2>&1
else
  export PATH="/usr/local/cuda/bin:$PATH"
  MMCORE_CUDA=ON "$PY" -m pip install -q ".[test,bench]" >"$OUT/build.log" 2>&1
fi
log "install: rc=$? in $(( $(date +%s) - start )) s"
"$PY" -c "import mmcore; print('cuda_available', mmcore.cuda_available())" 2>&1 | tee -a "$OUT/summary.txt"
(cd "$OUT" && timeout 150 "$PY" -m pytest -q -rs -m gpu -p no:cacheprovider "$OLDPWD/tests" \
  -o addopts="" >"$OUT/gpu_tests.log" 2>&1)
log "gpu tests: rc=$? ($(tail -1 "$OUT/gpu_tests.log"))"
timeout 120 "$PY" benchmarks/bench_kernels.py --json "$OUT/kernels.json" >"$OUT/kernels.txt" 2>&1
log "bench_kernels: rc=$?"
timeout 120 "$PY" benchmarks/battery.py --cells 10000 --device cuda --methods raw,mmcore,safetensors-set \
  --json "$OUT/battery.json" >"$OUT/battery.txt" 2>&1
log "battery: rc=$?"
cat "$OUT/kernels.txt" "$OUT/battery.txt" >>"$OUT/summary.txt" 2>/dev/null
log "done in $(( $(date +%s) - start )) s"
