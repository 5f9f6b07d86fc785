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

say() { echo "bootstrap: $*"; }   # one line per step: pip itself stays quiet (-q)

if [ ! -x .venv/bin/python ]; then
    say "creating .venv with $("$PYTHON" --version 2>&1) ($PYTHON)"
    "$PYTHON" -m venv .venv
fi
py=.venv/bin/python
export PIP_DISABLE_PIP_VERSION_CHECK=1

cpu_index="${TORCH_CPU_INDEX_URL:-https://download.pytorch.org/whl/cpu}"
if "$py" -c "import torch" >/dev/null 2>&1; then
    say "torch is installed already ($("$py" -c 'import torch; print(torch.__version__)'))"
elif [ -n "${TORCH_INDEX_URL:-}" ]; then
    say "installing $TORCH_SPEC from $TORCH_INDEX_URL (TORCH_INDEX_URL; a large download, minutes)"
    "$py" -m pip install -q "$TORCH_SPEC" --index-url "$TORCH_INDEX_URL"
elif command -v nvidia-smi >/dev/null 2>&1; then
    say "installing $TORCH_SPEC, the CUDA build (an NVIDIA GPU is here), from PyPI: several GB, minutes"
    "$py" -m pip install -q "$TORCH_SPEC"
# No GPU: a CPU wheel, never the CUDA build. A local wheel (pip's find-links) first, else PyTorch's CPU index;
# torch's own dependencies come with requirements.txt below.
elif "$py" -m pip install -q --no-index --no-deps "$TORCH_SPEC" 2>/dev/null; then
    say "installed $TORCH_SPEC (CPU) from a local wheel"
else
    say "installing $TORCH_SPEC, the CPU build (no NVIDIA GPU here), from $cpu_index: about 200 MB, a minute or more"
    "$py" -m pip install -q "$TORCH_SPEC" --index-url "$cpu_index"
fi

reqs=requirements.txt
[ "$dev" = 1 ] && reqs=requirements-dev.txt
say "installing what $reqs lists that is missing (onnxruntime, Flask, gunicorn, RQ, ...$([ "$dev" = 1 ] && echo ", test tools")) from PyPI"
"$py" -m pip install -q -r "$reqs"
say "installing the video tracker (trackers, supervision) without their dependencies (requirements-nodeps.txt: they list opencv-python, a second cv2)"
"$py" -m pip install -q --no-deps -r requirements-nodeps.txt
say "installing this checkout into .venv (pip install -e .)"
"$py" -m pip install -q --no-deps -e .

# The dashboard's browser test drives the distribution's Chromium through its chromedriver (nothing downloaded at
# test time). As root with apt-get, --dev installs them when missing; otherwise it says the command.
if [ "$dev" = 1 ]; then
    if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then
        say "Chromium and chromedriver are installed (the dashboard's browser test uses them)"
    elif [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
        say "installing Chromium and chromedriver with apt-get (the dashboard's browser test; about 300 MB)"
        if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver \
                >/dev/null; }; then
            say "apt-get could not install chromium chromium-driver: the browser test will skip and say so"
        fi
    else
        say "no Chromium: the browser test will skip (to run it: sudo apt-get install -y chromium chromium-driver)"
    fi
fi
say ".venv ready ($("$py" -c 'import torch; print("torch", torch.__version__)'))"
