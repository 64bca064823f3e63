#!/usr/bin/env bash
# Prepared 2026-12-07 02:51 UTC, revised 04:58 (split K added). Issue #15, what the next GPU call times (≈ 9 min):
# (1) decode_profile, same call: DiJiang 8K x 8 compiled, default against split K (skinny_linear.SPLIT_K "auto":
#     the MLP's 3072 -> 768 product as 4 partial products of 192 programs, their sum fused by Inductor into the
#     residual add and LayerNorm after it; the product took 7.1 us alone against 3.4 for 768 -> 2304, H100
#     sweep 2026-12-06. Expected: -2 to -3 us per layer, 0.413 -> ~0.38 ms); Pre-LN 512 x 1 with and without;
#     NOBLE 512 x 1 default (0.600 ms) and, last (its programs wait for each other), with z computed once per
#     layer (noble_decode.SHARED_Z; expected ~0.53 ms, 0.92x Pre-LN).
# (2) skinny_linear_gpu: the head (77 MB; 2.4 TB/s in the step) with wider column blocks, and the MLP down
#     product's partials at 2, 3, 4, 6 parts, 8 rows.
# (3) bench decode preln,dijiang_scratch at 32K x 8 with split K (the 10x cell: 9.90x at 02:44), then
#     preln,noble_fused at 512 x 8, 32 compiled (NOBLE's b 8 and 32 never measured).
R=/tmp/r_callH; rm -rf $R; mkdir -p $R; export PYTHONUNBUFFERED=1
nvidia-smi > $R/gpu.txt 2>&1
python3 -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())" | tee -a $R/gpu.txt
save() { tar czf $OUT/results.tgz -C $R . ; }
trap save EXIT
# (0) the new kernels' tests on the GPU (real kernels, not the interpreter)
timeout 100 python3 -m pytest -q -p no:cacheprovider tests/test_noble_decode.py tests/test_linear_argmax.py \
  tests/test_skinny_linear.py -k "split or shared or argmax or activation" > $R/pytest_log.txt 2>&1
tail -3 $R/pytest_log.txt
save
V="dijiang 8K x8 compiled;dijiang 8K x8 compiled, split K;noble 512 x1 compiled, NOBLE kernel;preln 512 x1 compiled;preln 512 x1 compiled, split K;noble 512 x1 compiled, NOBLE kernel, shared z, GELU in kernel"
timeout 230 python3 -u benchmarks/decode_profile.py --out $R/profile --budget 220 --variants "$V" > $R/profile_log.txt 2>&1
grep "^\[" $R/profile_log.txt
save
timeout 110 python3 -m leanformer bench decode --size gpt2 --arms preln,dijiang_scratch --contexts 32768 --batches 8 \
  --compile --kernels split=auto --time-budget 95 --out $R/split32k > $R/split32k_log.txt 2>&1
grep "bench decode\]" $R/split32k_log.txt
save
timeout 60 python3 -u benchmarks/skinny_linear_gpu.py --out $R/head --shapes lm_head,down --rows 8 --wide \
  --splits 2,3,4,6 --budget 45 > $R/head_log.txt 2>&1
grep "M=" $R/head_log.txt
save
timeout 100 python3 -m leanformer bench decode --size gpt2 --arms preln,noble_fused --contexts 512 --batches 8,32 \
  --compile --time-budget 85 --out $R/noble > $R/noble_log.txt 2>&1
grep "bench decode\]" $R/noble_log.txt
