#!/usr/bin/env bash
# Create ./.venv with everything the backend needs; `--dev` adds the test tools.
# Safe to run again: it only installs what is missing.
#
# torch: the build is chosen for the machine. TORCH_INDEX_URL, when set, is passed to pip for torch only
# (e.g. PyTorch's CPU wheel index on a machine without a GPU, to avoid several GB of CUDA packages).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
dev=0
[ "${1:-}" = "--dev" ] && dev=1

if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
py=.venv/bin/python
export PIP_DISABLE_PIP_VERSION_CHECK=1

if ! "$py" -c "import torch" >/dev/null 2>&1; then
    if [ -n "${TORCH_INDEX_URL:-}" ]; then
        "$py" -m pip install -q "$TORCH_SPEC" --index-url "$TORCH_INDEX_URL"
    else
        "$py" -m pip install -q "$TORCH_SPEC"
    fi
fi

reqs=requirements.txt
[ "$dev" = 1 ] && reqs=requirements-dev.txt
"$py" -m pip install -q -r "$reqs"
"$py" -m pip install -q --no-deps -e .
echo "bootstrap: .venv ready ($("$py" -c 'import torch; print("torch", torch.__version__)'))"
