#!/usr/bin/env bash
# Prepared 2026-12-07 23:40 UTC. ≈ 9 min. Chained after callAI on the same machine. Issue #13: the two-segment
# product by TMA (two_segment_matmul.TMA: tiles loaded and C stored through tensor descriptors,
# two_segment_tma_kernel). callAE: the pointer kernel is 1.17-1.38x cuBLAS's main product (16,384 tokens; 10.74 ms of
# the route's step in 144 calls, where Pre-LN's products take ~8.2).
# Expected: TMA loads free the registers and issue slots the pointer loads' address arithmetic takes, and the TMA
# store writes C in bulk: 5-15% faster per product (1.05-1.25x cuBLAS); the step ~0.5-1.5 ms faster if so.
# (0) GPU pytest of the route and product tests (TMA ones included; the compiled TMA route goes through Inductor's
#     triton_op with TensorDescriptor arguments here, not on the CPU). Expected: pass.
# (1) noble_train_gpu.py --sections products: per shape and direction, cuBLAS, the pointer kernel (both loop forms) and
#     the TMA form, each of CANDIDATES (4-stage tiles fitted to 3 stages with the TMA store's tile); writes
#     two_segment_configs.json with both forms' best tiles.
# (2) train_profile.py: GPT-2 b16 NOBLE by the route (separate branch) with those tiles, pointer kernel vs TMA (the
#     rotary tables by callAI's op in both).
source docs/gpu/preamble.sh callAJ
timeout 100 python3 -m pytest -q -rs -p no:cacheprovider tests/test_noble_train_kernel.py -k "tma or two_segment or compiles" \
  > $R/pytest_log.txt 2>&1
tail -3 $R/pytest_log.txt
save
timeout 200 python3 -u benchmarks/noble_train_gpu.py --out $R/noble --sections products --budget 180 \
  > $R/noble_log.txt 2>&1
grep -v "^\[" $R/noble_log.txt | head -12
save
C=$R/noble/two_segment_configs.json
[ -f $C ] && TS="--two-segment-configs $C" || TS=""
P="gpt2 noble_fused b16 cudagraphs route sepbranch tma,gpt2 noble_fused b16 cudagraphs route sepbranch"
TORCH_LOGS=output_code TORCH_LOGS_OUT=$R/output_code.txt timeout 280 python3 -u benchmarks/train_profile.py --sections steps --plan "$P" --budget 270 --out $R/steps $TS \
  > $R/steps_log.txt 2>&1
grep "^\[" $R/steps_log.txt | tail -4
gzip -f $R/output_code.txt
