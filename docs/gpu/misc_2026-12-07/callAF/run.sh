#!/usr/bin/env bash
# Prepared 2026-12-07 21:40 UTC. ≈ 8 min. Issue #13: GPT-2 small b16 steps under CUDA graphs, no logits: Pre-LN, NOBLE
# stacked with the CosNet kernels (53.28 ms against Pre-LN's 37.38 at 18:51, callW: +42.5%), NOBLE by the training
# route (branch fused with CosNet; and separate), the route's tiles from callAE's two_segment_configs.json when it is
# in the tree. Expected: the route removes the stacked form's extra element-wise passes (the GELU reading the strided
# stacked output and adding the branch 1.65 ms, the [dy, dz] concatenations 1.36 ms, the stacked bias sums 1.05 ms)
# and the narrower tiles of the stacked products, for its own rank-r launches: NOBLE ≈ +20-30% (≈ 45-48 ms) if the
# two-segment products run at cuBLAS's speed; the bound from the bytes with separate rank-r launches is +8-11% plus
# the branch's FLOPs (≈ +2.5%) and CosNet.
source docs/gpu/preamble.sh callAF
C=docs/gpu/misc_2026-12-07/callAE/out/noble/two_segment_configs.json
[ -f $C ] && TS="--two-segment-configs $C" || TS=""
P="gpt2 preln b16 cudagraphs,gpt2 noble_fused b16 cudagraphs cosk,gpt2 noble_fused b16 cudagraphs route,gpt2 noble_fused b16 cudagraphs route sepbranch"
timeout 560 python3 -u benchmarks/train_profile.py --sections steps --plan "$P" --budget 530 --out $R/steps $TS \
  > $R/steps_log.txt 2>&1
grep "^\[" $R/steps_log.txt | tail -8
