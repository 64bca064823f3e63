#!/usr/bin/env bash
# The short form of run.sh for the last device time of 2026-12-06 (258 s left): NOBLE's step and peak memory
# against Pre-LN's with z in a buffer of its own (issue #13: memory <= 1.05x), GPT-2 small, b16, CUDA graphs.
R=/tmp/r; mkdir -p $R; export PYTHONUNBUFFERED=1
nvidia-smi > $R/gpu.txt 2>&1; git rev-parse --short HEAD >> $R/gpu.txt 2>&1
save() { tar czf $OUT/results.tgz -C $R . ; }
trap save EXIT
P="gpt2 preln b16 cudagraphs,gpt2 noble_fused b16 cudagraphs cosk"
timeout 200 python3 -u benchmarks/train_profile.py --sections steps --plan "$P" --budget 170 --out $R/steps \
  > $R/steps_log.txt 2>&1
grep -v "^ " $R/steps_log.txt | tail -12
