#!/usr/bin/env bash
# Prepared 2026-12-08 00:50 UTC, revised 01:10 and 01:20 (not run in that session: its device time was spent).
# ≈ 8.5 min.
# Issue #13. callAK: the TMA form of the two-segment product is 1.08-1.28x cuBLAS's main product where the pointer
# kernel is 1.19-1.39x (each at its best of 3 tiles, same call), but NOBLE's compiled step failed on it: Inductor
# could not take tensor descriptors from a triton_op. The TMA form is now an opaque custom op that re-checks its
# operands and falls back to the pointer kernel (review of 01:00).
# (0) GPU pytest of the TMA tests (the compiled route included: its TMA launches counted). Expected: pass.
# (1) noble_train_gpu.py products, the TMA form against its persistent form (two_segment_matmul.PERSISTENT: one
#     program per SM looping over tiles), first 3 tiles. Expected: persistent 2-5% faster (one prologue per SM, a
#     tile's store draining under the next tile's loads), or no gain (the loads of a new tile still wait).
# (2) train_profile.py: NOBLE's GPT-2 b16 step by the route (separate branch) with the TMA products, then with the
#     pointer products, each with its best tiles from callAK, then Pre-LN, all in this call.
#     Expected: TMA ≈ 0.5-1 ms faster than pointers (0.055 ms less per 6 products in callAK x 12 layers ≈ 0.7 ms;
#     the route's products took 10.74 ms in callAF). If so, two_segment_matmul.TMA becomes the default.
#     Inductor's code kept: why the route's rotary and GELU backward kernels grew against Pre-LN's (callAF).
source docs/gpu/preamble.sh callAL
timeout 60 python3 -m pytest -q -rs -p no:cacheprovider tests/test_noble_train_kernel.py -k "tma or bias" \
  > $R/pytest_log.txt 2>&1
tail -3 $R/pytest_log.txt
save
timeout 100 python3 -u benchmarks/noble_train_gpu.py --out $R/noble --sections products --budget 85 \
  --candidates 3 --forms tma,tmap > $R/noble_log.txt 2>&1
grep "TMA persistent" $R/noble_log.txt
save
C=docs/gpu/misc_2026-12-07/callAK/out/noble/two_segment_configs.json
P="gpt2 noble_fused b16 cudagraphs route sepbranch tma,gpt2 noble_fused b16 cudagraphs route sepbranch,gpt2 preln b16 cudagraphs"
TORCH_LOGS=output_code TORCH_LOGS_OUT=$R/output_code.txt timeout 340 python3 -u benchmarks/train_profile.py \
  --sections steps --plan "$P" --budget 330 --out $R/steps --two-segment-configs $C > $R/steps_log.txt 2>&1
grep "^\[" $R/steps_log.txt | tail -4
gzip -f $R/output_code.txt $R/steps_log.txt  # the generated code: the route's rotary and GELU backward kernels
