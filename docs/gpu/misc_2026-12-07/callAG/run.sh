#!/usr/bin/env bash
# Prepared 2026-12-07 21:45 UTC. ≈ 4 min. Issue #13's shaped attention fwd+bwd ≤ 1.3× SDPA at every length from 512:
# met from 8K, missed below, but only ever timed as lone calls, where the host's launches dominate (1.55-4.48×,
# callC; the mix kernel no better there). A compiled training step with CUDA graphs pays the GPU's time only, so
# this times each call replayed from a CUDA graph (`bench attention --graphs`, B 4, H 12, d 64, bf16, causal), the
# mix as PyTorch's chain and as our kernel (shaped.MIX_KERNEL "cuda"). Expected from the bytes (a (B, H, T, D) bf16
# tensor is 6.3 MB at 1K): the kernel's mix adds ≈ 8 passes, ≈ 20 µs at 1K against SDPA's ≈ 100 µs fwd+bwd, so
# ≈ 1.2-1.3× from 1K; the chain ≈ 1.9× (its profiled kernels summed to 0.19 ms against SDPA's 0.10 at 1K).
source docs/gpu/preamble.sh callAG
for mix in never cuda; do
  timeout 110 python3 -c "
import sys
from leanformer.layers import shaped
shaped.MIX_KERNEL = '$mix'
from leanformer.cli import main
sys.exit(main(['bench', 'attention', '--methods', 'softmax,shaped', '--graphs', '--lengths', '512,1024,2048,4096,8192,16384', '--out', '$R/attn_mix_$mix']))
" > $R/attn_mix_$mix.log 2>&1
  tail -14 $R/attn_mix_$mix.log
  save
done
