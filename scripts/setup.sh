#!/usr/bin/env bash
# Creates or reuses .venv and installs the project with its pinned stack. Safe to run twice.
# Also installs a Java runtime (TorchServe needs one) through apt when `java` is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3

ver=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
if [ "$ver" != "3.11" ]; then
  echo "error: Python 3.11 is required (found $ver at $(command -v "$PYTHON")); set PYTHON=/path/to/python3.11" >&2
  exit 1
fi

if ! command -v java >/dev/null 2>&1; then
  echo "==> installing a Java runtime for TorchServe (apt)"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq openjdk-17-jre-headless >/dev/null
fi

stamp="$VENV/.installed"
want=$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
echo "==> creating $VENV and installing the pinned stack (first time: about 3 minutes)"
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip
"$VENV/bin/pip" install -q -c constraints.txt -e '.[platform,dev]'
echo "$want" > "$stamp"
echo "==> ready: $VENV"
