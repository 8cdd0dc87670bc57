#!/usr/bin/env bash
# fastpref's one entry point. From a fresh clone it creates .venv, installs everything (CPU torch
# pinned first, so nothing pulls a CUDA build), builds the C++ kernels, then runs:
#   ./run.sh demo [args]    the main job: python -m fastpref demo
#   ./run.sh test [args]    the test suite (tests/ and one pass of each benchmark)
#   ./run.sh bench [args]   the benchmark report: python -m fastpref bench
set -euo pipefail
cd "$(dirname "$0")"
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

cmd=${1:-}
[ $# -gt 0 ] && shift
case "$cmd" in
    demo)  exec "$py" -m fastpref demo "$@" ;;
    bench) exec "$py" -m fastpref bench "$@" ;;
    test)  exec "$py" -m pytest tests benchmarks --benchmark-disable -q "$@" ;;
    *) echo "usage: ./run.sh demo|test|bench [args]" >&2; exit 2 ;;
esac
