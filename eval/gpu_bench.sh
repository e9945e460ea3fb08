#!/usr/bin/env bash
# The prepared GPU benchmark: one run on one H100 (planned for under 8 minutes; not yet run on one).
# The LLaVA-1.5-7B architecture with random weights, bf16, sdpa; batch 1 and 8; 64 and 144 of the 576 image
# tokens kept; every registered method, prefill (with its kernel launches) and decode; into
# eval/results/gpu-h100. Then compiled decoding next to eager for a pre-LLM and a layer-2 method, batch 8,
# 64 kept, into eval/results/gpu-h100-compile (COMPILE=0 skips it).
# Overrides, for a dry run elsewhere: ARCH, DEVICE, DTYPE, METHODS, REPEATS, OUT, COMPILE.
set -euo pipefail
cd "$(dirname "$0")/.."
arch=${ARCH:-llava-1.5-7b}
common=(--arch "$arch" --device "${DEVICE:-cuda}" --dtype "${DTYPE:-bfloat16}" --repeats "${REPEATS:-3}" --new-tokens 16)
out=${OUT:-eval/results/gpu-h100}
tokenprune bench "${common[@]}" --batch-sizes 1,8 --keep-ratios 0.111,0.25 --methods "${METHODS:-}" --out "$out"
if [ "${COMPILE:-1}" != 0 ]; then
  tokenprune bench "${common[@]}" --batch-sizes 8 --keep-ratios 0.111 --methods divprune,fastv --compile \
    --out "$out-compile"
fi
