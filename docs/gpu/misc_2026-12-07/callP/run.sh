#!/usr/bin/env bash
# Prepared 2026-12-07 12:50 UTC. Issue #14's bench attention target for the paper map at 4K (≥ 1.0× SDPA, lone
# call fwd+bwd, B 4, H 12, d 64; missed at 0.62–0.69× by host time: fla's route reads its range guard back to
# the host in every call), ≈ 3 min: the mix through fla's forward kernel with one gate per token (dijiang_gated:
# no host read; its backward three more forward passes) against fla's shifted route and the fused kernel, both
# maps, at 4K and 16K. Expected: dijiang_gated's lone call near its GPU time (fla at 4K: ≈ 0.75 ms fwd+bwd per
# call through the shift, 2026-12-05; the gated route runs 4 forward passes, ≈ 0.8–1.2 ms), so ≥ 1.0× SDPA's
# ≈ 1.6 ms at 4K if the host keeps up.
source docs/gpu/preamble.sh callP
timeout 170 python3 -m leanformer bench attention --lengths 4096,16384 \
  --methods dijiang_gated,dijiang_official_gated,dijiang_fla,dijiang_fused,dijiang_official_fla \
  --out $R/attention > $R/attention_log.txt 2>&1
tail -22 $R/attention/attention.md
