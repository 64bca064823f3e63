#!/usr/bin/env bash
# callH cut to ≈ 3.5 min (the last device time of 2026-12-07's morning session): split K only. DiJiang 8K x 8
# compiled with and without it (tokens compared to the default's by decode_profile), then the 32K x 8 cell
# (target 10x softmax; 9.90x at 02:44) with it. What it expects: run.sh beside this file.
R=/tmp/r_callH; rm -rf $R; mkdir -p $R; export PYTHONUNBUFFERED=1
nvidia-smi > $R/gpu.txt 2>&1
save() { tar czf $OUT/results.tgz -C $R . ; }
trap save EXIT
V="dijiang 8K x8 compiled;dijiang 8K x8 compiled, split K"
timeout 120 python3 -u benchmarks/decode_profile.py --out $R/profile --budget 60 --variants "$V" > $R/profile_log.txt 2>&1
grep "^\[" $R/profile_log.txt
save
timeout 95 python3 -m leanformer bench decode --size gpt2 --arms preln,dijiang_scratch --contexts 32768 --batches 8 \
  --compile --kernels split=auto --time-budget 80 --out $R/split32k > $R/split32k_log.txt 2>&1
grep "bench decode\]" $R/split32k_log.txt
