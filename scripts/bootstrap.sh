#!/usr/bin/env bash
# Create ./.venv with everything the backend needs; `--dev` adds the test tools.
# Safe to run again: it only installs what is missing.
#
# torch: the build is chosen for the machine. TORCH_INDEX_URL, when set, is passed to pip for torch only.
# Otherwise: with an NVIDIA GPU (nvidia-smi) the default build; without one a CPU wheel (a local one that pip's
# find-links offers, else PyTorch's CPU wheel index), so no several-GB CUDA download on CPU-only machines.
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
    elif command -v nvidia-smi >/dev/null 2>&1; then
        "$py" -m pip install -q "$TORCH_SPEC"           # the default build (CUDA)
    # No GPU: a CPU wheel, never the CUDA build. A local wheel (pip's find-links) first, else PyTorch's CPU index;
    # torch's own dependencies come with requirements.txt below.
    elif ! "$py" -m pip install -q --no-index --no-deps "$TORCH_SPEC" 2>/dev/null; then
        "$py" -m pip install -q "$TORCH_SPEC" --index-url "${TORCH_CPU_INDEX_URL:-https://download.pytorch.org/whl/cpu}"
    fi
fi

reqs=requirements.txt
[ "$dev" = 1 ] && reqs=requirements-dev.txt
"$py" -m pip install -q -r "$reqs"
"$py" -m pip install -q --no-deps -e .
echo "bootstrap: .venv ready ($("$py" -c 'import torch; print("torch", torch.__version__)'))"
