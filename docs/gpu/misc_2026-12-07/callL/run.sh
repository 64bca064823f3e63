#!/usr/bin/env bash
# Prepared 2026-12-07 09:00 UTC. Issue #15's 8K prefill, after callK (≈ 9.5 min): softmax and DiJiang, each
# compiled whole and replayed from a CUDA graph at one chunk of 8,192 (DiJiang through its fused form, FUSED_MAX_LEN
# 8192), the pair the target compares at their fastest forms. Each compiles the whole model twice (before and
# after a restart, ≈ 2 min each on an H100). Expected: both walls near their kernels (softmax's ≈ 9.5 ms eager,
# less compiled; DiJiang's ≈ 8.3 ms compiled at chunks of 4,096, 2026-12-07 08:23).
R=/tmp/r_callL; rm -rf $R; mkdir -p $R; export PYTHONUNBUFFERED=1
nvidia-smi > $R/gpu.txt 2>&1
python3 -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())" | tee -a $R/gpu.txt
save() { tar czf $OUT/results.tgz -C $R . ; }
trap save EXIT
V="preln 8K chunk 8192, compiled whole model, graph;dijiang 8K chunk 8192, fused ≤ 8192, compiled whole model, graph"
timeout 560 python3 -u benchmarks/prefill_profile.py --out $R/prefill --budget 330 --variants "$V" > $R/prefill_log.txt 2>&1
grep "^\[" $R/prefill_log.txt
