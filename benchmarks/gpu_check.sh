#!/usr/bin/env bash
# GPU check (issue 16): benchmarks/gpu_check.sh OUTDIR [--dry-run] [--peers-dir DIR]
#
# Runs the CUDA tests, real-checkpoint pair and drift in bf16, a 24-block Llama pair, device_map
# placement, the CKA overhead over the bare bf16 forward loop and the per-batch sync count, and
# writes the figures to OUTDIR/gpu_check.json (rewritten after every section). Hard limit: 8 min.
# --dry-run: CPU, tiny models, few texts; checks the plumbing only (see benchmarks/README.md).
set -euo pipefail
if [[ $# -lt 1 ]]; then
    echo "usage: $0 OUTDIR [--dry-run] [--peers-dir DIR]" >&2
    exit 2
fi
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
exec timeout --signal=TERM 480 "${PYTHON:-python}" "$root/benchmarks/gpu_check.py" "$@"
