#!/usr/bin/env bash
# Create .venv with the pinned environment (requirements.lock) and the project installed in it.
# torch/torchvision are CUDA builds that also run on the CPU; pip takes them from the machine's
# wheel store when it has one (about 2 minutes), else from PyPI.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3.11}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --disable-pip-version-check -r requirements.lock
.venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps -e .
.venv/bin/dvc config core.analytics false
