#!/usr/bin/env bash
# Prepared 2026-12-07 19:45 UTC. ≈ 7 min. Issue #15's NOBLE decoding (0.670x Pre-LN at 512 x 32, 0.742x at x 1;
# target 0.9x).
# (0) GPU pytest of noble_decode's split and z-apart routes and COSNET_PRECISION "tf32" (within 5e-3 of float64).
#     Expected: pass.
# (1) noble_decode_gpu.py with the two-launch columns: z once in column blocks of its own ("partials", expected ≈
#     plain N+R: 3.1-3.9 µs), then the epilogue ("finish"); "two launches" against the one-launch NOBLE kernel
#     (5.2-14.2 µs, callY). Worth it where two launches < one: expected at 32 rows and r ≥ 32 (NOBLE − plain N+R
#     5.3-10.4 µs there), not at 1 row (≈ 2 µs). "tf32 CosNet": the r x r product per program on tensor cores
#     instead of FMAs (32 x 32 x 32 FMAs per program at 32 rows, r 32); if that product is the cost, NOBLE − plain
#     N+R falls most at r 64 and 32 rows.
# (2) decode_profile.py: GPT-2 NOBLE at 512 x 32 and x 1, split K (the default), with Z_APART, with COSNET_PRECISION
#     "tf32", and Pre-LN, one process. What is faster becomes the default (x 32: 1.040 ms at 16:47).
source docs/gpu/preamble.sh callAD
timeout 120 python3 -m pytest -q -rs -p no:cacheprovider tests/test_noble_decode.py \
  -k "split or z_apart or cosnet_precision" > $R/pytest_log.txt 2>&1
tail -3 $R/pytest_log.txt
save
timeout 150 python3 -u benchmarks/noble_decode_gpu.py --out $R/noble --budget 130 > $R/noble_log.txt 2>&1
tail -16 $R/noble_log.txt
save
V="preln 512 x32 compiled;noble 512 x32 compiled, NOBLE kernel, split K;noble 512 x32 compiled, NOBLE kernel, split K, z apart;noble 512 x32 compiled, NOBLE kernel, split K, tf32 CosNet;preln 512 x1 compiled;noble 512 x1 compiled, NOBLE kernel, split K;noble 512 x1 compiled, NOBLE kernel, split K, z apart;noble 512 x1 compiled, NOBLE kernel, split K, tf32 CosNet"
timeout 260 python3 -u benchmarks/decode_profile.py --out $R/profile --budget 240 --variants "$V" > $R/profile_log.txt 2>&1
tail -12 $R/profile_log.txt
