#!/usr/bin/env bash
# The one-call GPU check (benchmarks/README.md, "The GPU check"): from the repository root
# of an installed checkout (pip install -e .), on one GPU:
#     bash benchmarks/gpu_check.sh                      # one table, under 8 minutes on an H100
#     bash benchmarks/gpu_check.sh --json gpu.json      # the rows as JSON as well
#     bash benchmarks/gpu_check.sh --device cpu         # tiny sizes: the test of this script
# Nothing is downloaded: every model is random, of the real shapes, built from a config.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
exec timeout 600 python benchmarks/gpu_check.py "$@"
