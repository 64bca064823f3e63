#!/usr/bin/env bash
# Prepared 2026-12-07 02:20 UTC: item (3) of callD/run.sh on its own (the 8K prefill, issue #15): the boundary
# terms and running normaliser compiled on CUDA, the ops called directly, and each chunk as one compiled graph
# (StaticDecoder(compile_prefill=True)), for DiJiang and softmax, against "as before 2026-12-07".
# Then issue #15's 32K x 8 cell with the head's product and argmax in one kernel (--kernels argmax=in-head).
# Then SAS-P at 32K x 1, the one cell of its 9 not measured compiled.
R=/tmp/r_callE; rm -rf $R; mkdir -p $R; export PYTHONUNBUFFERED=1
nvidia-smi > $R/gpu.txt 2>&1
python3 -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())" | tee -a $R/gpu.txt
save() { tar czf $OUT/results.tgz -C $R . ; }
trap save EXIT
timeout 200 python3 -u benchmarks/prefill_profile.py --out $R/prefill --budget 180 > $R/prefill_log.txt 2>&1
grep "^\[" $R/prefill_log.txt
save
timeout 170 python3 -m leanformer bench decode --size gpt2 --arms preln,dijiang_scratch --contexts 32768 --batches 8 \
  --compile --kernels argmax=in-head --time-budget 150 --out $R/head_argmax > $R/head_argmax_log.txt 2>&1
grep "bench decode\]" $R/head_argmax_log.txt
save
# issue #15: SAS-P's one unmeasured cell (32K x 1), compiled, against softmax in the same run
timeout 140 python3 -m leanformer bench decode --size gpt2 --arms preln,sas_p --contexts 32768 --batches 1 \
  --compile --time-budget 120 --out $R/sasp_32k1 > $R/sasp_32k1_log.txt 2>&1
grep "bench decode\]" $R/sasp_32k1_log.txt
