#!/usr/bin/env bash
# GPU call of 2026-12-06 (issue #13's shaped-attention target, fwd+bwd <= 1.3x SDPA from 512 to 32K): the mix
# in leanformer.ops.shaped_mix's Triton kernels ('shaped_kernel') beside SDPA, the eager and the compiled
# PyTorch forms, B 4, H 12, d 64, bf16 (benchmarks/train_profile.py --sections shaped); then issue #15's 8K
# prefill profile (docs/gpu/prefill_2026-12-06/run.sh's first part). One tarball under $OUT.
R=/tmp/r; mkdir -p $R; export PYTHONUNBUFFERED=1
nvidia-smi > $R/gpu.txt 2>&1
python3 -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())" | tee -a $R/gpu.txt
save() { tar czf $OUT/results.tgz -C $R . ; }
trap save EXIT
timeout 240 python3 -u benchmarks/train_profile.py --sections shaped --out $R/shaped > $R/shaped_log.txt 2>&1
grep "shaped causal" $R/shaped_log.txt
save
timeout 280 python3 -u benchmarks/prefill_profile.py --out $R/prefill --budget 220 > $R/prefill_log.txt 2>&1
grep "^\[" $R/prefill_log.txt
