#!/usr/bin/env bash
# Prepared 2026-12-07 03:10 UTC, not run when prepared (no device time left). Issue #15's 8K prefill (DiJiang's
# time <= softmax's; 52.6 against 28.0 ms eager on an H100 at 02:47, DiJiang's kernels 11.6 ms against 13.4):
# the prefill with each block compiled (StaticDecoder(compile_prefill=True), prefill_unit "blocks", the default:
# the blocks share their graphs, so GPT-2 compiles one block's graphs, not the whole 12-layer forward, whose
# compile did not finish in ~120 s at 02:47), for DiJiang and softmax, against the eager prefill. Expected:
# both walls near their kernels' time, DiJiang's below softmax's.
R=/tmp/r_callI; rm -rf $R; mkdir -p $R; export PYTHONUNBUFFERED=1
nvidia-smi > $R/gpu.txt 2>&1
python3 -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())" | tee -a $R/gpu.txt
save() { tar czf $OUT/results.tgz -C $R . ; }
trap save EXIT
timeout 360 python3 -u benchmarks/prefill_profile.py --out $R/prefill --budget 240 > $R/prefill_log.txt 2>&1
grep "^\[" $R/prefill_log.txt
