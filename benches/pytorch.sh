#!/usr/bin/env bash
# Fulgur's CPU backend against PyTorch (transformers' MiniMaxForCausalLM) on the same config, weights, tokens
# and machine, f32: forward time, logits agreement and peak memory. Sets up its own Python environment in
# target/pytorch (torch 2.11 and transformers from PyPI, about a minute and 1 GiB the first time).
#
#   benches/pytorch.sh [CONFIG] [--batch B] [--seq T] [--repeats N] [--rounds R]
#   (default: bench-s, 1 x 1024, 3 repeats, 3 rounds alternating PyTorch and Fulgur)
#
# Prints the JSON of benches/pytorch_minimax.py; the numbers go in docs/perf.md.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
config=models/configs/bench-s.json
if [[ $# -gt 0 && $1 != --* ]]; then config=$1; shift; fi
env=target/pytorch
if ! PYTHONPATH=$env python3 -c "import torch, transformers, safetensors" 2>/dev/null; then
  echo "setting up $env (torch 2.11, transformers)" >&2
  python3 -m pip install --quiet --target "$env" "torch==2.11.*" transformers safetensors
fi
bash .ci/llvm
cargo build --release --quiet
work=target/pytorch-bench/$(basename "$config" .json)
rm -rf "$work"
PYTHONPATH=$env python3 benches/pytorch_minimax.py "$config" "$work" --fulgur target/release/fulgur "$@"
