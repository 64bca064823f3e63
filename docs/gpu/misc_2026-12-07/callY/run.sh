#!/usr/bin/env bash
# Prepared 2026-12-07 17:30 UTC. ≈ 3 min. Issue #15's NOBLE decoding (0.670x Pre-LN at 512 x 32, target 0.9x): where
# one NOBLE launch's extra time goes (9.68 µs against 4.97 for a plain product of the same shape at 32 rows, callS).
# benchmarks/noble_decode_gpu.py: GPT-2's o (768 -> 768) and MLP-up (768 -> 3072) layers at 1 and 32 rows, rank 16,
# 32, 64: the plain product of W, the plain product of [W; W_down] (main and z once each, no epilogue), the NOBLE
# kernel, and the NOBLE kernel with 32- and 64-column blocks (fewer programs recomputing z), each per launch inside a
# CUDA graph of 50 launches. Expected: plain N ≈ 5 µs; plain N+R within 0.5 µs of it; NOBLE − plain N+R ≈ 4-5 µs at
# 32 rows. If that difference shrinks with wider blocks, z's recomputation costs; if it grows with R at any block
# width, the epilogue (CosNet's R x R product, two cosines per element of z, the rank-R up product) costs.
source docs/gpu/preamble.sh callY
timeout 220 python3 -u benchmarks/noble_decode_gpu.py --out $R/noble --budget 200 > $R/noble_log.txt 2>&1
tail -16 $R/noble_log.txt
