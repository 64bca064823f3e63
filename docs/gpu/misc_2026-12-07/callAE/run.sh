#!/usr/bin/env bash
# Prepared 2026-12-07 21:40 UTC, revised 22:10. ≈ 8 min. Issue #13's NOBLE step (+42.5% over Pre-LN at b16, target
# ≤ +10%): the training route (leanformer.ops.noble_train: the up product inside the main product's inner axis, dz
# W_down inside dx's, by a two-segment Triton product of our own; z and CosNet in one launch reading x, ds and
# CosNet's backward in one launch reading dy).
# (0) GPU pytest of the route and its kernels against float64 (fp32 without TF32 within 1e-5; bf16 within bf16
#     rounding), and the device-equivalence NOBLE checks with the route. Expected: all pass.
# (1) noble_train_gpu.py products: per shape at 16,384 tokens, bf16: cuBLAS's main product alone, cuBLAS main +
#     rank-32 addmm, and the two-segment kernel with 7 tile shapes in 2 loop forms (the fastest again with K2 = 0: the
#     Triton product alone), each per call in a CUDA graph of 20 (no host launch time). Floors: 768→768 19.3 GFLOP =
#     25 µs at 775 TFLOP/s, 50 MB of x and y = 17 µs at 3 TB/s; 768→3072 and 3072→768 77 GFLOP = 100 µs. Expected:
#     the best tiles within 0.95-1.10x of cuBLAS's main product (Inductor's Triton templates beat nvjet on some of
#     these shapes under max-autotune, callJ: 16.06 against 17.34 ms of products per step), so ≤ 1.0x of main +
#     addmm. Its out/noble/two_segment_configs.json, committed into the tree, feeds callAF and callAH.
# (2) noble_train_gpu.py branch: the rank-r launches with CosNet alone, GB/s of x or dy read (16,384 × 768 bf16 =
#     25 MB, × 3072 = 101 MB), 5 (BLOCK_K, warps, stages) variants, against cuBLAS's x W_downᵀ. Expected: near
#     cuBLAS's rate (≈ 1.5-2.5 TB/s at these sizes, 15 µs a call at 768 measured in profiles), else the "separate"
#     branch form is the faster one.
source docs/gpu/preamble.sh callAE
timeout 200 python3 -m pytest -q -rs -p no:cacheprovider tests/test_noble_train_kernel.py \
  tests/test_device_equivalence.py -k "not test_device_equivalence or noble" > $R/pytest_log.txt 2>&1
tail -3 $R/pytest_log.txt
save
timeout 330 python3 -u benchmarks/noble_train_gpu.py --out $R/noble --sections products,branch --budget 300 \
  > $R/noble_log.txt 2>&1
tail -24 $R/noble_log.txt
