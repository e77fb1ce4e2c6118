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
  if ! "$PY" -m venv "$VENV" >/dev/null 2>&1; then
    # Debian's python3 ships without ensurepip unless python3-venv is installed
    rm -rf "$VENV"
    if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" -eq 0 ]; then
      echo "[dev.sh] '$PY -m venv' failed (no ensurepip): installing python3-venv with apt-get"
      apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
      "$PY" -m venv "$VENV"
    else
      echo "[dev.sh] '$PY -m venv' failed: install your distribution's venv package (Debian: sudo apt-get install python3-venv) and run this again" >&2
      exit 1
    fi
  fi
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
    exec "$VENV/bin/python" -m eval.demo "$@"
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
