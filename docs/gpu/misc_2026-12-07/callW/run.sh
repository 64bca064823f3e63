#!/usr/bin/env bash
# Prepared 2026-12-07 17:05 UTC. ≈ 8 min. train_profile.py --sections steps, GPT-2 small b16 seq 1024 under CUDA
# graphs, the steps returning no logits (the default since 14:40):
# - DiJiang by the fused kernel and through the gated route with fla's backward kernels (the default from 4,096
#   tokens since 17:00). At 1K with the reversed passes the gated route was 0.964x the fused kernel (14:02); fla's
#   backward took 2.9 ms off the 4K step, and the flips it removes scale with tokens (the same 16,384 here), so
#   expected ≈ 50.4 - 1.8 (logits) - 2.9 ≈ 45.7 ms against the fused kernel's ≈ 46.8: if the gated route is faster,
#   GATED_FLA_TRAINING_FROM goes down to 1024. Issue #14's 1K target: ≥ 0.9x Pre-LN (0.820x at 14:02).
# - NOBLE (CosNet kernels) against Pre-LN without the logits: issue #13's ≤ +10% (+38.7% at 11:24 with them).
source docs/gpu/preamble.sh callW
P="gpt2 preln b16 cudagraphs,gpt2 dijiang_scratch b16 cudagraphs,gpt2 dijiang_scratch b16 cudagraphs gated flabwd,gpt2 noble_fused b16 cudagraphs cosk"
timeout 520 python3 -u benchmarks/train_profile.py --sections steps --plan "$P" --budget 480 --out $R/steps \
  > $R/steps_log.txt 2>&1
grep "^\[" $R/steps_log.txt | tail -4
