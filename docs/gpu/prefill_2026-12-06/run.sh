#!/usr/bin/env bash
# GPU call of 2026-12-06 (issue #15's prefill target: an 8K prompt, DiJiang's time ≤ softmax's): where an
# 8K prefill goes, wall time against GPU kernel time, launches and host ops, softmax and DiJiang side by side
# (benchmarks/prefill_profile.py); then bench decode's own time to first token at 8K for both. One tarball.
R=/tmp/r; mkdir -p $R; export PYTHONUNBUFFERED=1
nvidia-smi > $R/gpu.txt 2>&1; git rev-parse --short HEAD >> $R/gpu.txt 2>&1
python3 -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())" | tee -a $R/gpu.txt
save() { tar czf $OUT/results.tgz -C $R . ; }
trap save EXIT
timeout 300 python3 -u benchmarks/prefill_profile.py --out $R/profile --budget 240 > $R/profile_log.txt 2>&1
grep "^\[" $R/profile_log.txt
save
timeout 150 python3 -m leanformer bench decode --size gpt2 --arms preln,dijiang_scratch --contexts 8192 \
  --batches 1 --out $R/bench_ttft > $R/bench_ttft_log.txt 2>&1
tail -6 $R/bench_ttft_log.txt
