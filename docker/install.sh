#!/usr/bin/env bash
# The one install script: the Makefile, CI and the container images all run it.
# Installs reinforge with its demo/test extras into $VENV (default .venv); torch first, as a matching pair.
set -euo pipefail
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
TORCH_SPEC=${TORCH_SPEC:-"torch==2.14.1 torchvision==0.29.1"}
EXTRAS=${EXTRAS:-test}
cd "$(dirname "$0")/.."
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
# shellcheck disable=SC2086
"$VENV/bin/python" -m pip install -q $TORCH_SPEC
"$VENV/bin/python" -m pip install -q -e ".[$EXTRAS]"
"$VENV/bin/python" -c "import torch, torchvision, ray, reinforge; print('installed: torch', torch.__version__, 'torchvision', torchvision.__version__, 'ray', ray.__version__)"
