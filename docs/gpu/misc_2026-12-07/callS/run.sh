#!/usr/bin/env bash
# Prepared 2026-12-07 15:00 UTC. ≈ 6 min. Issue #15's NOBLE ≥ 0.9× softmax's tokens/s (0.64× at 512 × 32, 0.72× at
# × 1; H100 2026-12-07 14:13 and 08:13). At batch 32 each NOBLE launch took 11.73 µs against Pre-LN's plain product's
# 4.99 (callN2), and halving the column blocks changed nothing: the suspect is the MLP's down product (K 3072, 12 K
# tiles per program, not split as Pre-LN's is). noble_decode.SPLIT_K (off) runs such a layer as partial products of
# [W; W_down] over parts of K, then one kernel for the sums and the branch.
# (0) dropped 15:30: the split tests passed on an H100 at 15:16 (callT: 9 passed, 70 s).
# (1) decode_profile: Pre-LN and NOBLE at 512 × 32 and 512 × 1, NOBLE with and without SPLIT_K. Expected: the 12 down
#     launches per step from ≈ 20 µs to ≈ 5 + 4 µs (partials as Pre-LN's skinny_partials, 5.08 µs; the finish
#     kernel ≈ 3–4 µs): ≈ 0.1 ms off NOBLE's 1.10 ms step at × 32 (0.64× → ≈ 0.70×); less at × 1.
source docs/gpu/preamble.sh callS
V="preln 512 x32 compiled;noble 512 x32 compiled, NOBLE kernel;noble 512 x32 compiled, NOBLE kernel, split K;preln 512 x1 compiled;noble 512 x1 compiled, NOBLE kernel;noble 512 x1 compiled, NOBLE kernel, split K"
timeout 330 python3 -u benchmarks/decode_profile.py --out $R/profile --budget 300 --variants "$V" > $R/profile_log.txt 2>&1
grep "^\[" $R/profile_log.txt
