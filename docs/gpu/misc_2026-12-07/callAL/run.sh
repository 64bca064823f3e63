#!/usr/bin/env bash
# Prepared 2026-12-08 00:50 UTC. ≈ 4 min (trimmed at 00:55 to the device time left: 313 s). Issue #13. callAK: the TMA form is 1.08-1.28x cuBLAS's main product where
# the pointer kernel is 1.19-1.39x (both at their best of 3 tiles, same call), but NOBLE's compiled step failed on it:
# Inductor could not take tensor descriptors from a triton_op. The TMA form is now an opaque custom op.
# (0) no GPU pytest (the device time left: 313 s); the step below compiles and runs the route.
# (1) train_profile.py: NOBLE's GPT-2 b16 step by the route (separate branch) with the TMA products, then with the
#     pointer products, each with its best tiles from callAK, then Pre-LN.
#     Expected: TMA ≈ 0.5-1 ms faster (the route's products took 10.74 ms in callAF). Trimmed: the pointer run is
#     left out (callAF's 51.36 ms against Pre-LN's 38.01 is the comparison, another machine).
source docs/gpu/preamble.sh callAL
C=docs/gpu/misc_2026-12-07/callAK/out/noble/two_segment_configs.json
P="gpt2 noble_fused b16 cudagraphs route sepbranch tma,gpt2 preln b16 cudagraphs"
timeout 200 python3 -u benchmarks/train_profile.py --sections steps --plan "$P" --budget 190 --out $R/steps \
  --two-segment-configs $C > $R/steps_log.txt 2>&1
grep "^\[" $R/steps_log.txt | tail -4
