#!/usr/bin/env bash
# Prepared 2026-12-07 19:45 UTC. ≈ 9 min. Issue #13.
# (0) GPU pytest of what changed after callZ: the loss kernel writing z̄ over the logits (z[y] now taken in the first
#     pass: the review's race), its programs looping over rows (ROW_PROGRAMS_PER_SM), FUSED "cuda" with the model,
#     and in tests/test_device_equivalence.py the kernel at GPT-2's vocabulary against float64 and the compiled
#     rotary tables in float32 on the GPU within 1e-6. Expected: all pass.
# (1) train_profile.py, GPT-2 small b16 under CUDA graphs: the plain step; the in-place loss kernel on the whole batch
#     (the library's default on CUDA since 19:30) with one program per row and with 2 and 4 programs per SM looping
#     over rows; the same with GPT-2's learned positions. The kernel took 1.625 ms at b16 (callZ, before in place):
#     1.65 GB read twice and written once at 3.05 TB/s. If the second read came from L2 with fewer rows in flight,
#     ≈ 1.1 ms: expected rows2 ≈ 0.4-0.5 ms faster than one program per row, or slower if the kernel is latency-bound.
#     Learned positions: ≈ 1.5 ms faster than RoPE at b16 (the rotary kernels ≈ 1.7 ms, callZ). Then RoPE at b32
#     with the loss kernel (the default route; 479,762 tokens/s at 19:21 before the rotary fix) and with 2 programs
#     per SM: issue #13's 500,000 with RoPE needs 65.5 ms (68.30 at 19:21).
# (2) step_copies.py, then again with the Python frames around each copy and gap (--python-frames): whether the pageable host-to-device copies at
#     the step's start (≈ 0.6 ms of idle, callV) are gone now that compiled code builds the rotary tables from
#     constants (each layer's CPU inv_freq was a graph input, found on the CPU at 19:35); if some remain, which host
#     code makes them. The plain b16 step in (1) is then expected ≈ 0.5 ms faster than callZ's 37.09 ms.
source docs/gpu/preamble.sh callAC
timeout 100 python3 -m pytest -q -rs -p no:cacheprovider tests/test_linear_cross_entropy.py \
  tests/test_device_equivalence.py -k "not test_device_equivalence or head_and_loss or rotary" > $R/pytest_log.txt 2>&1
tail -3 $R/pytest_log.txt
save
P="gpt2 preln b16 cudagraphs,gpt2 preln b16 cudagraphs fusedloss whole,gpt2 preln b16 cudagraphs fusedloss whole rows2,gpt2 preln b16 cudagraphs fusedloss whole rows4,gpt2 preln b16 cudagraphs learnedpos,gpt2 preln b32 cudagraphs fusedloss whole,gpt2 preln b32 cudagraphs fusedloss whole rows2"
timeout 330 python3 -u benchmarks/train_profile.py --sections steps --plan "$P" --budget 310 --out $R/steps \
  > $R/steps_log.txt 2>&1
grep "^\[" $R/steps_log.txt | tail -7
save
timeout 70 python3 -u benchmarks/step_copies.py --arm preln --batch 16 --mode reduce-overhead --out $R/copies \
  > $R/copies_log.txt 2>&1
tail -16 $R/copies_log.txt
save
timeout 70 python3 -u benchmarks/step_copies.py --arm preln --batch 16 --mode reduce-overhead --python-frames \
  --out $R/copies_frames > $R/copies_frames_log.txt 2>&1
tail -8 $R/copies_frames_log.txt
