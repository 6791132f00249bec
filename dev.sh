#!/usr/bin/env bash
# One entry point for a fresh machine: makes ./.venv, installs fastdcgan into it (once, and again
# whenever setup.py or csrc/ changes), then runs what was asked.
#   bash dev.sh train [flags]   python -m fastdcgan.train on the built-in faces (or --data PATH)
#   bash dev.sh generate [...]  python -m fastdcgan.generate
#   bash dev.sh test [args]     pytest tests/
#   bash dev.sh bench [args]    pytest benches/ --benchmark-only
#   bash dev.sh python [...]    the venv's python
set -euo pipefail
cd "$(dirname "$0")"
py=${PYTHON:-python3}
venv=.venv
if [ ! -x "$venv/bin/python" ]; then
  "$py" -m venv "$venv"
fi
vpy="$venv/bin/python"
stamp="$venv/.fastdcgan-installed"
# torch first and pinned: the CPU wheel on disk; a bare `torch` would pull a multi-GB CUDA build.
# --no-build-isolation: the C++ extension builds against this torch, not a downloaded one.
if [ ! -f "$stamp" ] || [ -n "$(find setup.py csrc -newer "$stamp" 2>/dev/null | head -1)" ]; then
  "$vpy" -m pip install -q --upgrade pip setuptools wheel
  "$vpy" -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
  "$vpy" -m pip install -q "triton==3.9.0" ninja
  "$vpy" -m pip install -q --no-build-isolation -e ".[test]"
  touch "$stamp"
fi
cmd=${1:-}
[ $# -gt 0 ] && shift
case "$cmd" in
  train)    exec "$vpy" -m fastdcgan.train "$@" ;;
  generate) exec "$vpy" -m fastdcgan.generate "$@" ;;
  test)     exec "$vpy" -m pytest tests/ "$@" ;;
  bench)    exec "$vpy" -m pytest benches/ --benchmark-only "$@" ;;
  python)   exec "$vpy" "$@" ;;
  *) echo "usage: bash dev.sh {train|generate|test|bench|python} [args...]" >&2; exit 2 ;;
esac
