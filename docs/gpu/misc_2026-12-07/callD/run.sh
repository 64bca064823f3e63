#!/usr/bin/env bash
# GPU call D (issues #14, #15): (1) lone attention calls with our ops called directly in eager (eager_op) against
# the registered-op path, host time by op and by Python function (the 4K lone-call cells of bench attention);
# (2) NOBLE's decoding step with q, k, v in one launch against apart; 
# (3) bench decode NOBLE vs Pre-LN at 512 x 1, 8, 32 compiled. Expected: (1) DiJiang's 1K wall 2.08 ms ->
# ~1.6; (2) NOBLE 0.721 -> ~0.59 ms (24 launches fewer). One tarball under $OUT.
R=/tmp/r_callD; rm -rf $R; mkdir -p $R; export PYTHONUNBUFFERED=1
nvidia-smi > $R/gpu.txt 2>&1
python3 -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())" | tee -a $R/gpu.txt
save() { tar czf $OUT/results.tgz -C $R . ; }
trap save EXIT
timeout 70 python3 -u benchmarks/attention_host_profile.py --out $R/host --op-path-too \
  --methods softmax,dijiang_fused,shaped --lengths 1024,4096 --repeats 20 --profiled 3 > $R/host_log.txt 2>&1
grep "^\[" $R/host_log.txt
save
V="noble 512 x1 compiled, NOBLE kernel;noble 512 x1 compiled, NOBLE kernel, q k v apart;preln 512 x1 compiled"
timeout 110 python3 -u benchmarks/decode_profile.py --out $R/profile --budget 95 --variants "$V" > $R/profile_log.txt 2>&1
grep "^\[" $R/profile_log.txt
save
timeout 110 python3 -m leanformer bench decode --size gpt2 --arms preln,noble_fused --contexts 512 --batches 1,8,32 \
  --compile --time-budget 95 --out $R/noble > $R/noble_log.txt 2>&1
grep "bench decode\]" $R/noble_log.txt
