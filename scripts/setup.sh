#!/usr/bin/env bash
# Creates .venv and installs mmcore (the distribution mmcore-models) into it, editable
# and built in place, with the given extras (default: none).
#
# In place: `pip install -e .` builds the native module into the source tree
# (mmcore/_core*.so, gitignored; CMake's build files at the root, gitignored too),
# so Python code edits need no reinstall and `python -m mmcore` works from the
# repository root as well as anywhere else with .venv's python.
# Incremental: each step runs only when what it depends on changed since the
# last run (stamps in .venv/): the dependencies when pyproject.toml, the extras
# or the torch spec changed; the native module (a C++ and, where nvcc is found,
# CUDA build of about 40 s on 2 cores the first time) when csrc/, CMakeLists.txt,
# MMCORE_CUDA or MMCORE_CUDA_ARCHS changed, and then only the files that changed
# are recompiled (seconds). A run with nothing to do takes a few seconds (it
# imports torch once to say what is installed).
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
src_key=$( { find CMakeLists.txt pyproject.toml csrc -type f -print0 | sort -z | xargs -0 sha256sum;
  echo "MMCORE_CUDA=${MMCORE_CUDA:-AUTO} MMCORE_CUDA_ARCHS=${MMCORE_CUDA_ARCHS:-}"; } | digest)
target="."
if [ -n "$extras" ]; then
  target=".[$extras]"
fi

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
  # Before the rename to mmcore-models the distribution was called mmcore: a copy
  # installed under that name would shadow the editable one.
  if .venv/bin/python -m pip show -q mmcore >/dev/null 2>&1; then
    say "removing the old distribution 'mmcore' (now mmcore-models)"
    .venv/bin/python -m pip uninstall -q -y mmcore
  fi
  say "building mmcore in place (the first build takes about 40 s) and installing the rest"
  "${pip[@]}" --no-build-isolation -e "$target"
  echo "$deps_key" >"$deps_stamp"
  echo "$src_key" >.venv/.mmcore-build
elif [ "$(cat .venv/.mmcore-build 2>/dev/null)" != "$src_key" ] \
  || ! .venv/bin/python -I -c "import mmcore._core" 2>/dev/null; then
  say "native sources changed: rebuilding mmcore/_core in place (incremental)"
  "${pip[@]}" --no-build-isolation --no-deps -e "$target"
  echo "$src_key" >.venv/.mmcore-build
fi
say "ready: $(.venv/bin/python -I -c 'import mmcore, mmcore._core as c, torch; print(f"mmcore {mmcore.__version__} ({c.__file__}), torch {torch.__version__}, CUDA kernels built: {c.built_with_cuda}")')"
say "the command line is .venv/bin/mmcore (or: source .venv/bin/activate)"
