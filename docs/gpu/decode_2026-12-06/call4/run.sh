#!/usr/bin/env bash
# GPU call 4 of 2026-12-06 (issue #15): the few-row products' narrow tiles (BLOCK_N 16, 2 warps; default since
# this call's commit) against the wide rule in DiJiang's step, the one-pass step kernel, NOBLE's one-kernel
# layer, and DiJiang's 32K x 8 against softmax with each. Expected (call 1's sweep): narrow ≈ -34 us per GPT-2
# step at 8 rows (0.417 -> ~0.385 ms); single pass ≈ -12 us. One tarball under $OUT.
R=/tmp/r_call4; rm -rf $R; mkdir -p $R; export PYTHONUNBUFFERED=1
nvidia-smi > $R/gpu.txt 2>&1
python3 -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())" | tee -a $R/gpu.txt
save() { tar czf $OUT/results.tgz -C $R . ; }
trap save EXIT
V="dijiang 8K x8 compiled;dijiang 8K x8 compiled, wide tiles;dijiang 8K x8 compiled, skinny, single pass"
V="$V;noble 512 x1 compiled, NOBLE kernel;noble 512 x1 compiled;preln 512 x1 compiled"
timeout 230 python3 -u benchmarks/decode_profile.py --out $R/profile --budget 200 --variants "$V" > $R/profile_log.txt 2>&1
grep "^\[" $R/profile_log.txt
save
for k in default single; do
  extra=""; [ $k = single ] && extra="--kernels step=single"
  timeout 150 python3 -m leanformer bench decode --size gpt2 --arms preln,dijiang_scratch --contexts 32768 \
    --batches 8 --compile $extra --out $R/bench_$k > $R/bench_${k}_log.txt 2>&1
  grep "dijiang_scratch\|preln" $R/bench_${k}_log.txt | tail -2
  save
done
