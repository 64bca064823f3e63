#!/usr/bin/env bash
# Prepared 2026-12-07 02:51 UTC, not run when prepared (the device time was spent on calls D, F, G). What the
# next GPU call should time first (≈ 8 min on an H100), issue #15:
# (1) NOBLE's step with z computed once per layer (noble_decode.SHARED_Z) against the default (the one-kernel
#     layer, q k v in one launch, the GELU inside: 0.600 ms at 512 x 1, H100 02:24), Pre-LN beside. Expected:
#     each NOBLE launch 7.4 -> ~5.5 us, the step ~0.53 ms (0.92x Pre-LN). The variant runs last: its programs
#     wait for each other (by tickets, so they cannot deadlock; a hang would still stop what follows).
# (2) bench decode preln,noble_fused at 512 x 1, 8, 32, compiled (NOBLE's b 8 and 32 are not measured yet).
# (3) the head's product (8 x 768 -> 50,304, 77 MB) with wider column blocks: 32 us at 2.4 TB/s in DiJiang's
#     32K x 8 step (9.90x, target 10x); at 90% of the H100's 3.35 TB/s the step would reach 10x.
R=/tmp/r_callH; rm -rf $R; mkdir -p $R; export PYTHONUNBUFFERED=1
nvidia-smi > $R/gpu.txt 2>&1
python3 -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())" | tee -a $R/gpu.txt
save() { tar czf $OUT/results.tgz -C $R . ; }
trap save EXIT
# (0) the new kernels' tests on the GPU first (real kernels, not the interpreter): the shared-z kernel's waits,
#     the head's argmax kernel, the NOBLE kernel's activation epilogue
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_noble_decode.py tests/test_linear_argmax.py \
  > $R/pytest_log.txt 2>&1
tail -3 $R/pytest_log.txt
save
V="noble 512 x1 compiled, NOBLE kernel;preln 512 x1 compiled;noble 512 x1 compiled, NOBLE kernel, shared z, GELU in kernel"
timeout 150 python3 -u benchmarks/decode_profile.py --out $R/profile --budget 140 --variants "$V" > $R/profile_log.txt 2>&1
grep "^\[" $R/profile_log.txt
save
timeout 90 python3 -u benchmarks/skinny_linear_gpu.py --out $R/head --shapes lm_head --rows 1,8 --wide --budget 75 \
  > $R/head_log.txt 2>&1
grep "M=" $R/head_log.txt
save
timeout 170 python3 -m leanformer bench decode --size gpt2 --arms preln,noble_fused --contexts 512 --batches 1,8,32 \
  --compile --time-budget 155 --out $R/noble > $R/noble_log.txt 2>&1
grep "bench decode\]" $R/noble_log.txt
