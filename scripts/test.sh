#!/usr/bin/env bash
# The README's test command, and CI's (.ci/run): every test, against the wheel a
# user would install. Steps, each timed:
#   1. setup    .venv, editable and built in place (scripts/setup.sh dev): the linters
#   2. fuse3    the power-loss test's FUSE file system (said before it is installed)
#   3. lint     ruff check, ruff format --check, mypy mmcore, clang-format --dry-run
#   4. wheel    scripts/build_wheel.sh: the manylinux wheel, with the CUDA kernels for
#               every architecture of the release where nvcc is found
#   5. install  the wheel into .venv-wheel beside torch (MMCORE_TORCH, default
#               torch==2.13.0), made afresh whenever pyproject.toml or the torch spec change
#   6. pytest   the whole suite once (stress and crash tests included) with .venv-wheel's
#               python, from build/test-cwd, where the source tree cannot shadow the wheel
# Arguments go to pytest (e.g. -k verify, -x).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
torch_spec="${MMCORE_TORCH-torch==2.13.0}"
export PIP_DISABLE_PIP_VERSION_CHECK=1
begin=$SECONDS
step_start=$SECONDS
timings=()
step() { step_start=$SECONDS; echo "== $*"; }
done_step() {
  timings+=("$1 $((SECONDS - step_start)) s")
  echo "   $1 took $((SECONDS - step_start)) s"
}

step "setup: .venv (editable, built in place) for the linters"
bash scripts/setup.sh dev
done_step setup

step "fuse3"
# The power-loss test mounts a FUSE file system: libfuse3 and fusermount3 come
# from Debian's fuse3. Installed here when missing and we are root with apt-get
# (as in CI); else that one test skips.
if command -v fusermount3 >/dev/null; then
  echo "   fusermount3 is there: the power-loss test runs"
elif [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "   installing Debian's fuse3 with apt-get (apt-get update, then apt-get install fuse3):"
  echo "   tests/test_powerloss.py mounts a FUSE file system, which needs libfuse3 and"
  echo "   fusermount3; this runs as root, so it installs them (log: /tmp/mmcore-fuse3-install.log)"
  if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fuse3; } \
    >/tmp/mmcore-fuse3-install.log 2>&1; then
    echo "   could not install fuse3 (see /tmp/mmcore-fuse3-install.log): the power-loss test will skip"
  fi
else
  echo "   fusermount3 not found and not root: the power-loss test will skip (install Debian's fuse3 to run it)"
fi
done_step fuse3

step "lint: ruff, mypy, clang-format"
echo "   ruff check"; .venv/bin/ruff check .
echo "   ruff format --check"; .venv/bin/ruff format --check .
echo "   mypy mmcore"; .venv/bin/mypy mmcore
echo "   clang-format --dry-run"; .venv/bin/clang-format --dry-run --Werror csrc/*
done_step lint

step "wheel: scripts/build_wheel.sh (MMCORE_CUDA_ARCHS=${MMCORE_CUDA_ARCHS-80;86;89;90;100;120})"
bash scripts/build_wheel.sh wheelhouse
wheels=(wheelhouse/mmcore_models-*.whl)
wheel="$root/${wheels[0]}"
done_step wheel

step "install: the wheel into .venv-wheel beside ${torch_spec:-the torch there}"
venv="$root/.venv-wheel"
key=$( { cat pyproject.toml; echo "torch=$torch_spec"; } | sha256sum | cut -c1-32)
if [ "$(cat "$venv/.mmcore-deps" 2>/dev/null)" != "$key" ]; then
  echo "   making $venv afresh (dependencies: torch, then the test and bench extras)"
  rm -rf "$venv"
  python3 -m venv "$venv"
  if [ -n "$torch_spec" ]; then
    "$venv/bin/python" -m pip install -q "$torch_spec"
  fi
  "$venv/bin/python" -m pip install -q "$wheel[test,bench]"
  echo "$key" >"$venv/.mmcore-deps"
fi
"$venv/bin/python" -m pip install -q --force-reinstall --no-deps "$wheel"
done_step install

step "pytest: the installed wheel, run from build/test-cwd"
rm -rf build/test-cwd
mkdir -p build/test-cwd
cd build/test-cwd
unset PYTHONPATH
# The run must test the wheel: mmcore and its native module from .venv-wheel's
# site-packages, never the source tree (tests/test_packaging.py checks it again).
"$venv/bin/python" - <<'EOF'
import sys, sysconfig
from pathlib import Path
import mmcore
from mmcore._native import core
site = {Path(sysconfig.get_paths()[k]).resolve() for k in ("purelib", "platlib")}
for path in (Path(mmcore.__file__), Path(core().__file__)):
    if not any(path.resolve().is_relative_to(s) for s in site):
        sys.exit(f"test.sh: {path} is not in {sorted(map(str, site))}: the tests would not test the wheel")
mod = core()
kernels = f"CUDA kernels for {' '.join(mod.cuda_architectures)}" if mod.built_with_cuda else "CPU kernels only"
print(f"   testing {Path(mmcore.__file__).parent} ({kernels})")
EOF
done_step pytest-check
printf -v joined '%s, ' "${timings[@]}"
echo "== timings: ${joined%, }; $((SECONDS - begin)) s before pytest (its own time is its last line)"
export MMCORE_TEST_INSTALLED=1
exec "$venv/bin/python" -m pytest "$root/tests" -c "$root/pyproject.toml" --rootdir "$root" "$@"
