#!/usr/bin/env bash
# Prepared 2026-12-06 (night), not run yet: what the next GPU call should time first (≈ 9 min on an H100).
# 1. issue #15: NOBLE's one-kernel decoding layer against the cuBLAS route (twice cut short on 2026-12-06);
# 2. issue #15: the 8K prefill after the split-K final state (expected: the 3.1 ms FFMA product gone, DiJiang's
#    kernels ≈ 13 ms against softmax's 13.4; the wall time stays host-bound);
# 3. issue #13: shaped attention alone with chunks that fill the GPU (expected at 1K: the mix kernels ≈ 0.03 ms
#    instead of 0.078, the call's GPU time ≈ SDPA + 0.04 ms);
# 4. issue #15: SAS-P's compiled decoding steps at the contexts and batches not yet measured.
# Run from the repo root after the fla wheels are installed and PYTHONPATH is set; one tarball under $OUT.
R=/tmp/r_next; rm -rf $R; mkdir -p $R; export PYTHONUNBUFFERED=1
nvidia-smi > $R/gpu.txt 2>&1
python3 -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())" | tee -a $R/gpu.txt
save() { tar czf $OUT/results.tgz -C $R . ; }
trap save EXIT
timeout 150 python3 -u benchmarks/decode_profile.py --out $R/decode --budget 120 \
  --variants "noble 512 x1 compiled, NOBLE kernel;noble 512 x1 compiled;preln 512 x1 compiled" > $R/decode_log.txt 2>&1
grep "^\[" $R/decode_log.txt
save
timeout 120 python3 -u benchmarks/prefill_profile.py --out $R/prefill --budget 90 > $R/prefill_log.txt 2>&1
grep "^\[" $R/prefill_log.txt
save
timeout 100 python3 -u benchmarks/train_profile.py --sections shaped --out $R/shaped > $R/shaped_log.txt 2>&1
grep "shaped causal" $R/shaped_log.txt
save
timeout 160 python3 -m leanformer bench decode --size gpt2 --arms preln,sas_p --contexts 8192,32768 --batches 8,32 \
  --compile --out $R/sasp > $R/sasp_log.txt 2>&1
grep "bench decode\]" $R/sasp_log.txt
