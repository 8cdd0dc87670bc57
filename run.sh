#!/usr/bin/env bash
# fastpref's one entry point. From a fresh clone it creates .venv, installs everything (CPU torch
# pinned first, so nothing pulls a CUDA build), builds the C++ kernels, then runs:
#   ./run.sh demo [args]    the main job: python -m fastpref demo
#   ./run.sh test [args]    the test suite (tests/ and one pass of each benchmark)
#   ./run.sh bench [args]   the benchmark report: python -m fastpref bench
#   ./run.sh gpu-check [args]  on a GPU machine, with its own python3 and no venv: benchmarks/gpu_check.py
set -euo pipefail
cd "$(dirname "$0")"
if [ "${1:-}" = gpu-check ]; then
    shift
    PYTHONPATH=. exec python3 benchmarks/gpu_check.py "$@"
fi
venv=${FASTPREF_VENV:-.venv}
py="$venv/bin/python"
stamp="$venv/.fastpref-installed"

if [ ! -x "$py" ]; then
    python3 -m venv "$venv"
fi
if [ ! -f "$stamp" ] || [ -n "$(find pyproject.toml setup.py constraints.txt csrc -newer "$stamp" 2>/dev/null | head -1)" ]; then
    "$py" -m pip install -q --disable-pip-version-check --upgrade pip setuptools wheel
    "$py" -m pip install -q --disable-pip-version-check -c constraints.txt torch ninja pybind11
    "$py" -m pip install -q --disable-pip-version-check --no-build-isolation -c constraints.txt -e ".[dev]"
    touch "$stamp"
fi

# `test` also builds a side environment with a real legacy TRL (.ci/legacy-trl.txt), inside $venv so it is
# git-ignored and rebuilt with it, and names its python in FASTPREF_LEGACY_PYTHON for tests/test_trl_legacy.py.
legacy_env() {
    [ -n "${FASTPREF_LEGACY_PYTHON:-}" ] && return
    local env="$venv/legacy-trl"
    if [ ! -f "$env/.fastpref-installed" ] || [ -n "$(find .ci/legacy-trl.txt constraints.txt -newer "$env/.fastpref-installed" | head -1)" ]; then
        python3 -m venv "$env"
        "$env/bin/python" -m pip install -q --no-compile --disable-pip-version-check -c constraints.txt -r .ci/legacy-trl.txt
        touch "$env/.fastpref-installed"
    fi
    FASTPREF_LEGACY_PYTHON="$(cd "$env" && pwd)/bin/python"
    export FASTPREF_LEGACY_PYTHON
}

cmd=${1:-}
[ $# -gt 0 ] && shift
case "$cmd" in
    demo)  exec "$py" -m fastpref demo "$@" ;;
    bench) exec "$py" -m fastpref bench "$@" ;;
    test)  legacy_env; exec "$py" -m pytest tests benchmarks --benchmark-disable -q "$@" ;;
    *) echo "usage: ./run.sh demo|test|bench [args]" >&2; exit 2 ;;
esac
