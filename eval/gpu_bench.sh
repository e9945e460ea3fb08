#!/usr/bin/env bash
# The prepared GPU benchmark: one run on one H100, in three parts, each written as soon as it ends (a run cut
# short keeps the parts before). The LLaVA-1.5-7B architecture with random weights, bf16, sdpa:
#   1. eval/results/gpu-h100: batch 8, 64 and 144 of the 576 image tokens kept, every registered method,
#      prefill (with its kernel launches) and decode;
#   2. eval/results/gpu-h100-compile: compiled decoding next to eager for a pre-LLM, a layer-2 and the kv
#      method, batch 8, 64 kept (COMPILE=0 skips it);
#   3. eval/results/gpu-h100-batch1: batch 1, 64 kept, every method (where eager is bound by launches).
# Overrides, for a dry run elsewhere: ARCH, DEVICE, DTYPE, METHODS, REPEATS, OUT, COMPILE.
set -euo pipefail
cd "$(dirname "$0")/.."
arch=${ARCH:-llava-1.5-7b}
common=(--arch "$arch" --device "${DEVICE:-cuda}" --dtype "${DTYPE:-bfloat16}" --repeats "${REPEATS:-3}" --new-tokens 16)
out=${OUT:-eval/results/gpu-h100}
tokenprune bench "${common[@]}" --batch-sizes 8 --keep-ratios 0.111,0.25 --methods "${METHODS:-}" --out "$out"
if [ "${COMPILE:-1}" != 0 ]; then
  tokenprune bench "${common[@]}" --batch-sizes 8 --keep-ratios 0.111 --methods divprune,fastv,sparsevila \
    --compile --out "$out-compile"
fi
tokenprune bench "${common[@]}" --batch-sizes 1 --keep-ratios 0.111 --methods "${METHODS:-}" --out "$out-batch1"
