#!/usr/bin/env bash
# Create .venv with the pinned environment (requirements.lock) and the project installed in it.
# Python: $PYTHON if set, else the newest python3.13 / python3.12 / python3.11 on PATH.
# torch/torchvision are CUDA builds that also run on the CPU; pip takes them from the machine's
# wheel store when it has one (about 2 minutes), else from PyPI.
set -euo pipefail
cd "$(dirname "$0")"
if [ -z "${PYTHON:-}" ]; then
  for candidate in python3.13 python3.12 python3.11; do
    if "$candidate" -c "" 2>/dev/null; then PYTHON=$candidate; break; fi  # runs, not just a shim
  done
fi
[ -n "${PYTHON:-}" ] || { echo "setup.sh: needs Python 3.11, 3.12 or 3.13 (python3.1x on PATH, or PYTHON=...)" >&2; exit 1; }
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --disable-pip-version-check -r requirements.lock
.venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps -e .
.venv/bin/dvc config core.analytics false
