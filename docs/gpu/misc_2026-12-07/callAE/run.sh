#!/usr/bin/env bash
# Prepared 2026-12-07 21:40 UTC. ≈ 8 min. Issue #13's NOBLE step (+42.5% over Pre-LN at b16, target ≤ +10%): the
# training route (leanformer.ops.noble_train: the up product inside the main product's inner axis, dz W_down inside
# dx's, by a two-segment Triton product of our own; z and CosNet in one launch reading x, ds and CosNet's backward in
# one launch reading dy).
# (0) GPU pytest of the route and its kernels against float64 (fp32 without TF32 within 1e-5; bf16 within bf16
#     rounding), and the device-equivalence NOBLE checks with the route. Expected: all pass.
# (1) noble_train_gpu.py: per shape at 16,384 tokens, bf16: cuBLAS's main product alone, cuBLAS main + rank-32 addmm,
#     and the two-segment kernel with 7 tile shapes in 2 loop forms (the fastest again with K2 = 0: the Triton
#     product alone), each per call in a CUDA graph of 20 (no host launch time). Floors: 768→768
#     19.3 GFLOP = 25 µs at 775 TFLOP/s, 50 MB of x and y = 17 µs at 3 TB/s; 768→3072 and 3072→768 77 GFLOP = 100 µs.
#     Expected: the best tiles within 0.95-1.10x of cuBLAS's main product (Inductor's Triton templates beat nvjet on
#     some of these shapes under max-autotune, callJ: 16.06 against 17.34 ms of products per step), so ≤ 1.0x of
#     main + addmm. Then one NOBLE layer fwd+bwd compiled: stacked (CosNet kernels) vs the route (fused and separate
#     branch) vs nn.Linear; the route expected 15-30% faster than stacked (no branch output written and read back, no
#     [dy, dz] concatenation, no stacked bias sum) if (1)'s products hold. two_segment_configs.json (the best tiles)
#     feeds callAF.
source docs/gpu/preamble.sh callAE
timeout 150 python3 -m pytest -q -rs -p no:cacheprovider tests/test_noble_train_kernel.py \
  tests/test_device_equivalence.py -k "not test_device_equivalence or noble" > $R/pytest_log.txt 2>&1
tail -3 $R/pytest_log.txt
save
timeout 340 python3 -u benchmarks/noble_train_gpu.py --out $R/noble --budget 300 > $R/noble_log.txt 2>&1
tail -22 $R/noble_log.txt
