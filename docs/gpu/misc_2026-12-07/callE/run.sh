#!/usr/bin/env bash
# Prepared 2026-12-07 02:03 UTC: item (3) of callD/run.sh on its own (the 8K prefill, issue #15): the boundary
# terms and running normaliser compiled on CUDA, the ops called directly, and each chunk as one compiled graph
# (StaticDecoder(compile_prefill=True)), for DiJiang and softmax, against "as before 2026-12-07".
# (The 32K x 8 and SAS-P cells first put here moved to callF/run.sh.)
R=/tmp/r_callE; rm -rf $R; mkdir -p $R; export PYTHONUNBUFFERED=1
nvidia-smi > $R/gpu.txt 2>&1
python3 -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())" | tee -a $R/gpu.txt
save() { tar czf $OUT/results.tgz -C $R . ; }
trap save EXIT
timeout 200 python3 -u benchmarks/prefill_profile.py --out $R/prefill --budget 180 > $R/prefill_log.txt 2>&1
grep "^\[" $R/prefill_log.txt
save
