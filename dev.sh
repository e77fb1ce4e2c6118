#!/usr/bin/env bash
# One entry point for set-up, the demo and the tests. Idempotent: a second run reuses the virtualenv.
#   bash dev.sh demo   # set up .venv, then pretrain the demo model on the embedded dataset (README command 1)
#   bash dev.sh test   # set up .venv, then run the whole test suite              (README command 2)
set -euo pipefail
cd "$(dirname "$0")"
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}

setup() {
  local stamp="$VENV/.installed"
  if [ -f "$stamp" ] && [ "$stamp" -nt setup.py ]; then return 0; fi
  echo "[dev.sh] creating $VENV and installing dino-simpool with its dev extra (about 1-2 min the first time)"
  "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q -e '.[dev]'
  touch "$stamp"
}

cmd=${1:-help}
shift || true
case "$cmd" in
  setup) setup ;;
  demo)
    setup
    exec "$VENV/bin/python" -m dino_simpool.demo "$@"
    ;;
  test)
    setup
    set +e
    "$VENV/bin/python" -m pytest "$@"
    rc=$?
    set -e
    if [ "$rc" -eq 5 ]; then
      echo "[dev.sh] pytest collected no tests: that is a failure, not a pass" >&2
      exit 1
    fi
    exit "$rc"
    ;;
  *)
    echo "usage: bash dev.sh {setup|demo|test} [args]" >&2
    exit 2
    ;;
esac
