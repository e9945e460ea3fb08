#!/usr/bin/env bash
# The prepared GPU benchmark: one run on one H100 (5.5 minutes the first time, its compiled part cut
# short), in four parts, each written as soon as it ends (a run cut short keeps the parts before; a part
# that fails does not stop the next, and the run then exits non-zero).
# The LLaVA-1.5-7B architecture with random weights, bf16, sdpa:
#   1. eval/results/gpu-h100: batch 8, 64 and 144 of the 576 image tokens kept, every registered method,
#      prefill (with its kernel launches) and decode;
#   2. eval/results/gpu-h100-compile: compiled prefill and decoding (static cache, CUDA graphs) next to eager
#      for a layer-2 and the kv method, batch 8, 64 kept (COMPILE=0 skips it);
#   3. eval/results/gpu-h100-batch1: batch 1, 64 kept, every method (where eager is bound by launches);
#   4. eval/results/gpu-h100-compile-batch1: the whole prefill compiled (time to first token) against the
#      compiled unpruned one, batch 1, 64 kept, a pre-LLM, a layer-2 and a vision method (COMPILE=0 skips it).
# Overrides, for a dry run elsewhere: ARCH, DEVICE, DTYPE, METHODS, REPEATS, OUT, COMPILE.
set -uo pipefail
cd "$(dirname "$0")/.."
arch=${ARCH:-llava-1.5-7b}
common=(--arch "$arch" --device "${DEVICE:-cuda}" --dtype "${DTYPE:-bfloat16}" --repeats "${REPEATS:-3}" --new-tokens 16)
out=${OUT:-eval/results/gpu-h100}
status=0
tokenprune bench "${common[@]}" --batch-sizes 8 --keep-ratios 0.111,0.25 --methods "${METHODS:-}" --out "$out" || status=1
if [ "${COMPILE:-1}" != 0 ]; then
  tokenprune bench "${common[@]}" --batch-sizes 8 --keep-ratios 0.111 --methods fastv,sparsevila --compile \
    --out "$out-compile" || status=1
fi
tokenprune bench "${common[@]}" --batch-sizes 1 --keep-ratios 0.111 --methods "${METHODS:-}" --out "$out-batch1" \
  || status=1
if [ "${COMPILE:-1}" != 0 ]; then
  tokenprune bench "${common[@]}" --batch-sizes 1 --keep-ratios 0.111 --methods divprune,dart,visionzip --compile \
    --out "$out-compile-batch1" || status=1
fi
exit $status
