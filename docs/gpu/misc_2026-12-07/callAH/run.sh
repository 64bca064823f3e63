#!/usr/bin/env bash
# Prepared 2026-12-07 22:10 UTC. ≈ 6 min. After callAE: one NOBLE linear (CosNet, rank 32) fwd+bwd at 16,384 tokens,
# compiled, bf16, per call in a CUDA graph: nn.Linear, NOBLE stacked (CosNet kernels), NOBLE by the route (branch
# fused with CosNet, and separate), for 768→768, 768→3072, 3072→768, with callAE's tiles when its
# two_segment_configs.json is in the tree. Expected: the route 15-30% faster than stacked (no branch output written and
# read back, no [dy, dz] concatenation, no stacked bias sum), if callAE's products ran at cuBLAS's speed.
source docs/gpu/preamble.sh callAH
C=docs/gpu/misc_2026-12-07/callAE/out/noble/two_segment_configs.json
[ -f $C ] && TS="--configs $C" || TS=""
timeout 380 python3 -u benchmarks/noble_train_gpu.py --out $R/noble --sections layer --budget 350 $TS \
  > $R/noble_log.txt 2>&1
tail -10 $R/noble_log.txt
