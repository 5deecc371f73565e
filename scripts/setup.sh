#!/usr/bin/env bash
# Creates .venv and installs mmcore with the given extras (default: none).
#
# Incremental: each step runs only when what it depends on changed since the
# last run (stamps in .venv/): the dependencies when pyproject.toml, the extras
# or the torch spec changed; the package (a C++ and, where nvcc is found, CUDA
# build of about 40 s on 2 cores the first time, reused from build/ later) when
# csrc/, CMakeLists.txt or mmcore/ changed. A run with nothing to do takes a few
# seconds (it imports torch once to say what is installed).
# Torch: MMCORE_TORCH (default torch==2.13.0, the CPU wheel on the project's
# machines) is installed first, so no CUDA build of several GB is pulled in;
# set MMCORE_TORCH="" to keep a torch that is already there.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
python="${PYTHON:-python3}"
torch_spec="${MMCORE_TORCH-torch==2.13.0}"
start=$SECONDS
say() { printf 'setup [%3ds] %s\n' "$((SECONDS - start))" "$*"; }
digest() { sha256sum | cut -c1-32; }
export PIP_DISABLE_PIP_VERSION_CHECK=1
pip=(.venv/bin/python -m pip install -q)

if [ ! -x .venv/bin/python ]; then
  say "creating .venv ($("$python" --version 2>&1))"
  "$python" -m venv .venv
fi

deps_key=$( { cat pyproject.toml; echo "torch=$torch_spec"; } | digest)
deps_stamp=".venv/.mmcore-deps-${extras:-none}"  # one per set of extras: demo.sh and test.sh alternate
src_key=$( { find CMakeLists.txt pyproject.toml csrc mmcore -type f \
  ! -name '*.so' ! -name '*.pyc' -print0 | sort -z | xargs -0 sha256sum;
  echo "MMCORE_CUDA=${MMCORE_CUDA:-AUTO}"; } | digest)

if [ "$(cat "$deps_stamp" 2>/dev/null)" != "$deps_key" ]; then
  say "installing dependencies (torch: ${torch_spec:-already there}; extras: ${extras:-none})"
  "${pip[@]}" --upgrade pip
  if [ -n "$torch_spec" ]; then
    "${pip[@]}" "$torch_spec"
  fi
  # The build backend goes into the venv too, so rebuilds skip pip's isolated
  # build environment (seconds instead of about 20 s).
  read -r -a build_requires <<<"$(sed -n 's/^requires = \[\(.*\)\]/\1/p' pyproject.toml | tr -d '",')"
  "${pip[@]}" "${build_requires[@]}"
  target="."
  if [ -n "$extras" ]; then
    target=".[$extras]"
  fi
  say "building mmcore and installing the rest (the first build takes about 40 s)"
  "${pip[@]}" --no-build-isolation "$target"
  echo "$deps_key" >"$deps_stamp"
  echo "$src_key" >.venv/.mmcore-build
elif [ "$(cat .venv/.mmcore-build 2>/dev/null)" != "$src_key" ] \
  || ! .venv/bin/python -I -c "import mmcore._core" 2>/dev/null; then
  say "sources changed: rebuilding mmcore (incremental, in build/)"
  "${pip[@]}" --no-build-isolation --no-deps --force-reinstall .
  echo "$src_key" >.venv/.mmcore-build
fi
say "ready: $(.venv/bin/python -I -c 'import mmcore, torch; print(f"mmcore {mmcore.__version__}, torch {torch.__version__}, CUDA kernels usable: {mmcore.cuda_available()}")')"
say "the command line is .venv/bin/mmcore (or: source .venv/bin/activate)"
