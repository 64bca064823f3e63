#!/usr/bin/env bash
# Prepared 2026-12-07 02:25 UTC (issue #15): DiJiang's decoding step at 8K x 8 with the switches not timed yet,
# each against the default in the same call: few-row products in 8-column multiply-add blocks
# (skinny_linear.FMA_COLUMNS), the two-pass argmax, norms in the products, and the head's product with the greedy
# argmax in one kernel (decoding.ARGMAX_IN_HEAD, leanformer/ops/linear_argmax.py); then the 32K x 8 cell (target
# 10x softmax's tokens/s; 9.77x on 2026-12-06) with the head's argmax kernel, and SAS-P's one unmeasured cell.
R=/tmp/r_callF; rm -rf $R; mkdir -p $R; export PYTHONUNBUFFERED=1
nvidia-smi > $R/gpu.txt 2>&1
python3 -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())" | tee -a $R/gpu.txt
save() { tar czf $OUT/results.tgz -C $R . ; }
trap save EXIT
V="dijiang 8K x8 compiled;dijiang 8K x8 compiled, FMA 8 columns;dijiang 8K x8 compiled, two-pass argmax"
V="$V;dijiang 8K x8 compiled, norms in products;dijiang 8K x8 compiled, argmax in head"
V="$V;dijiang 8K x8 compiled, argmax in head, FMA 8 columns;preln 512 x1 compiled, FMA 8 columns;preln 512 x1 compiled"
timeout 230 python3 -u benchmarks/decode_profile.py --out $R/profile --budget 200 --variants "$V" > $R/profile_log.txt 2>&1
grep "^\[" $R/profile_log.txt
save
timeout 170 python3 -m leanformer bench decode --size gpt2 --arms preln,dijiang_scratch --contexts 32768 --batches 8 \
  --compile --kernels argmax=in-head --time-budget 150 --out $R/head_argmax > $R/head_argmax_log.txt 2>&1
grep "bench decode\]" $R/head_argmax_log.txt
save
timeout 140 python3 -m leanformer bench decode --size gpt2 --arms preln,sas_p --contexts 32768 --batches 1 \
  --compile --time-budget 120 --out $R/sasp_32k1 > $R/sasp_32k1_log.txt 2>&1
grep "bench decode\]" $R/sasp_32k1_log.txt
