#!/usr/bin/env bash
# Prepared 2026-12-08 00:15 UTC (callAI and callAJ, which got no machine, in one call). ≈ 8 min; trimmed at 00:30 to fit the device time left. Issue #13.
# (a) The rotary tables by one opaque op (leanformer::rotary_tables). Inductor had fused the table into every element
#     of q and k (a float64 angle, its remainder modulo 2π, a cos and a sin per element, forward and backward: the
#     kernels named ..._cos_..._sin_... in callAF's Pre-LN profile, 1.32 + 0.39 + 0.88 ms per step at b16). Expected:
#     the rotations become memory-bound (≈ 2.4 GB per step at b16, ≈ 0.8-0.9 ms), Pre-LN b16 ≈ 1.0-1.5 ms faster than
#     its "inlinerope" twin (the tables as before) in this call; b32 ≈ 67-68 ms (70.43 in callAC, 465,236 tokens/s;
#     500,000 needs 65.5 ms).
# (b) The two-segment product by TMA (two_segment_matmul.TMA: tiles loaded and C stored through tensor descriptors).
#     callAE: the pointer kernel is 1.17-1.38x cuBLAS's main product. Expected: 5-15% faster per product, the NOBLE
#     step ≈ 0.5-1.5 ms faster if so.
# (0) GPU pytest of the TMA tests (the compiled TMA route goes through Inductor's triton_op with TensorDescriptor
#     arguments here, not on the CPU) and the rotary tests. Expected: pass.
# (1) noble_train_gpu.py --sections products: cuBLAS, the pointer kernel (two loops) and the TMA form, each of the
#     first 3 CANDIDATES, per shape and direction; writes both forms' best tiles.
# (2) train_profile.py steps under CUDA graphs with those tiles: Pre-LN b16 and its inlinerope twin, NOBLE by the
#     route (separate branch) with TMA, Pre-LN b32 with the loss kernel (the route by pointers: callAF's 51.36 ms).
#     Inductor's generated code kept (gzipped) to compare the route's rotary and GELU backward kernels with Pre-LN's.
source docs/gpu/preamble.sh callAK
timeout 45 python3 -m pytest -q -rs -p no:cacheprovider tests/test_noble_train_kernel.py tests/test_model.py \
  tests/test_device_equivalence.py -k "tma or rotary" > $R/pytest_log.txt 2>&1
tail -3 $R/pytest_log.txt
save
timeout 110 python3 -u benchmarks/noble_train_gpu.py --out $R/noble --sections products --budget 95 \
  --candidates 3 --forms two,tma \
  > $R/noble_log.txt 2>&1
grep -v "^\[" $R/noble_log.txt | head -12
save
C=$R/noble/two_segment_configs.json
[ -f $C ] && TS="--two-segment-configs $C" || TS=""
P="gpt2 preln b16 cudagraphs,gpt2 preln b16 cudagraphs inlinerope,gpt2 noble_fused b16 cudagraphs route sepbranch tma,gpt2 preln b32 cudagraphs fusedloss whole"
TORCH_LOGS=output_code TORCH_LOGS_OUT=$R/output_code.txt timeout 330 python3 -u benchmarks/train_profile.py \
  --sections steps --plan "$P" --budget 315 --out $R/steps $TS > $R/steps_log.txt 2>&1
grep "^\[" $R/steps_log.txt | tail -6
gzip -f $R/output_code.txt $R/steps_log.txt
