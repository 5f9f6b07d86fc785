#!/usr/bin/env bash
# The GPU check, one command from a clean checkout on a machine with an NVIDIA GPU (README, "GPU"):
#   benchmarks/gpu_check.sh [--out DIR] [--data DIR] [--budget S]   set up (scripts/bootstrap.sh: the CUDA torch
#                                                                     build), then benchmarks/gpu_check.py
#   benchmarks/gpu_check.sh --cpu ...     the dry run CI makes: reuses an existing .venv, small sizes, CPU only
#   benchmarks/gpu_check.sh --pack [DIR]  copy what the check reads from ../shared/data into DIR
#                                         (default build/gpu-check-data, < 60 MiB: a device call can carry it)
# Output: DIR/table.md, DIR/results.json, DIR/log.txt (default build/gpu-check). Exit 1 when a check failed.
set -uo pipefail
cd "$(dirname "$0")/.."

cpu=0
pack=0
out=build/gpu-check
prev=""
for arg in "$@"; do
    case "$arg" in
        --cpu) cpu=1 ;;
        --pack) pack=1 ;;
        -h|--help) exec "${PYTHON:-python3}" benchmarks/gpu_check.py --help ;;
    esac
    [ "$prev" = "--out" ] && out="$arg"
    case "$arg" in --out=*) out="${arg#--out=}" ;; esac
    prev="$arg"
done

if [ "$pack" = 1 ]; then   # standard library only: no set-up needed
    exec "${PYTHON:-python3}" benchmarks/gpu_check.py "$@"
fi

mkdir -p "$out"
log="$out/log.txt"
: > "$log"
started=$(date +%s)
if [ "$cpu" = 1 ] && [ -x .venv/bin/python ]; then
    status=reused
    echo "set-up: --cpu reuses the existing .venv ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)' 2>&1))" >> "$log"
else
    echo "set-up: scripts/bootstrap.sh (nvidia-smi: $(command -v nvidia-smi || echo absent))" >> "$log"
    if ./scripts/bootstrap.sh >> "$log" 2>&1; then status=ok; else status=failed; fi
fi
seconds=$(( $(date +%s) - started ))

python="$PWD/.venv/bin/python"
[ -x "$python" ] || python="${PYTHON:-python3}"   # set-up failed: the table still says so
"$python" benchmarks/gpu_check.py "$@" --python "$python" --setup-status "$status" --setup-seconds "$seconds"
