#!/usr/bin/env bash
# Prepared 2026-12-07 17:50 UTC. ≈ 6 min. Issue #13's 500,000 tokens/s (Pre-LN 470,070 at b 32 on an H100, 16:45).
# (0) GPU pytest of the cross-entropy kernel (tests/test_linear_cross_entropy.py: float64 checks of the kernel route,
#     its compiled graph; on CUDA the route runs the compiled kernel). Expected: all pass.
# (1) train_profile.py: the head and the loss with each chunk's loss and gradient by one Triton kernel in bf16
#     (linear_cross_entropy.KERNEL, the default for FUSED since 17:45), in chunks of 4,096 and as the whole batch,
#     against the plain step and against the chunks by PyTorch's float32 ops (16:38: 0.957x). The plain step's
#     log-softmax forward and backward kernels took 1.10 + 1.74 ms at b 16 (callO), reading the 1.65 GB of bf16 logits
#     twice and writing their gradient: ≈ 3 passes. The kernel reads each row twice (the second mostly from L2) and
#     writes z̄ once: ≈ 2 passes of HBM traffic, ≈ 1.1-1.4 ms. Expected: b 16 37.1 -> ≈ 35.8-36.2 ms; b 32
#     69.7 -> ≈ 67-68 ms (≈ 485,000 tokens/s). "whole" saves the float32 ∂W sums over 4 chunks (≈ 0.3 ms).
source docs/gpu/preamble.sh callZ
timeout 120 python3 -m pytest -q -rs -p no:cacheprovider tests/test_linear_cross_entropy.py > $R/pytest_log.txt 2>&1
tail -3 $R/pytest_log.txt
save
P="gpt2 preln b16 cudagraphs,gpt2 preln b16 cudagraphs fusedloss,gpt2 preln b16 cudagraphs fusedloss whole,gpt2 preln b16 cudagraphs fusedloss torchce,gpt2 preln b32 cudagraphs,gpt2 preln b32 cudagraphs fusedloss whole"
timeout 400 python3 -u benchmarks/train_profile.py --sections steps --plan "$P" --budget 370 --out $R/steps \
  > $R/steps_log.txt 2>&1
grep "^\[" $R/steps_log.txt | tail -6
