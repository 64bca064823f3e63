#!/usr/bin/env bash
# callH cut to ≈ 6.5 min (for when less device time is left): the GPU tests of the new kernels, the profile of
# split K (DiJiang 8K x 8, Pre-LN 512 x 1) and of NOBLE's shared z (last: its programs wait for each other),
# then the 32K x 8 cell with split K. What each part expects: run.sh beside this file.
R=/tmp/r_callH; rm -rf $R; mkdir -p $R; export PYTHONUNBUFFERED=1
nvidia-smi > $R/gpu.txt 2>&1
save() { tar czf $OUT/results.tgz -C $R . ; }
trap save EXIT
timeout 70 python3 -m pytest -q -p no:cacheprovider tests/test_noble_decode.py tests/test_skinny_linear.py \
  -k "split or shared" > $R/pytest_log.txt 2>&1
tail -2 $R/pytest_log.txt
save
V="dijiang 8K x8 compiled;dijiang 8K x8 compiled, split K;preln 512 x1 compiled;preln 512 x1 compiled, split K;noble 512 x1 compiled, NOBLE kernel;noble 512 x1 compiled, NOBLE kernel, shared z, GELU in kernel"
timeout 190 python3 -u benchmarks/decode_profile.py --out $R/profile --budget 170 --variants "$V" > $R/profile_log.txt 2>&1
grep "^\[" $R/profile_log.txt
save
timeout 110 python3 -m leanformer bench decode --size gpt2 --arms preln,dijiang_scratch --contexts 32768 --batches 8 \
  --compile --kernels split=auto --time-budget 95 --out $R/split32k > $R/split32k_log.txt 2>&1
grep "bench decode\]" $R/split32k_log.txt
