#!/usr/bin/env bash
# Prepared 2026-12-07 14:50 UTC, tree after debe94a. ≈ 8 min. Issue #14's 4K training (DiJiang ≥ 1.3× Pre-LN;
# 0.919× through the gated route at 14:08, callO) and #13's 500K (Pre-LN b32).
# train_profile under CUDA graphs: Pre-LN seq 4096 b4; DiJiang gated with dk, dv from fla's backward kernels
# (gated_attention.BACKWARD "fla": no flips) and with the reversed passes (as timed at 14:08); Pre-LN b32 without the
# logits returned. Expected: the flips' 3.51 ms gone and two forward passes (chunk_fwd_h + chunk_fwd_o) replaced by
# chunk_bwd_dh + chunk_bwd_dv (about as costly): ≈ 51.9 → 48.4 ms, ≈ 0.99× Pre-LN at 4K (still short of 1.3×);
# Pre-LN b32 ≈ 72.6 − 3.2 ≈ 69.4 ms, ≈ 472,000 tokens/s on an H100 (451,606 at 11:25 with the logits); with the
# chunked loss (linear_cross_entropy.FUSED) ≈ 2 ms less again.
# Run callQ first: if its "fla" backward test failed, drop the flabwd run here.
source docs/gpu/preamble.sh callR
P="gpt2-4k preln b4 cudagraphs,gpt2-4k dijiang_scratch b4 cudagraphs gated flabwd,gpt2-4k dijiang_scratch b4 cudagraphs gated,gpt2 preln b32 cudagraphs,gpt2 preln b32 cudagraphs fusedloss"
timeout 520 python3 -u benchmarks/train_profile.py --sections steps --plan "$P" --budget 480 --out $R/steps \
  > $R/steps_log.txt 2>&1
grep "^\[" $R/steps_log.txt | tail -5
