#!/usr/bin/env bash
# GPU call B (issue #13, #15): crammed BERT (causal, 16 x 768, seq 128 x 128) with every SAS-P step profiled, so
# that the gap to the paper's 1.16x / 1.20x has kernel names; the mix kernel taken by SAS's float32 values; SAS-P
# without norms at GPT-2 (its FLOP-limit share last measured 2026-11-24). Then the 8K prefill profile after the
# split-K final state (expected: the 3.1 ms FFMA product gone; wall time still host-bound). One tarball under $OUT.
R=/tmp/r_callB; rm -rf $R; mkdir -p $R; export PYTHONUNBUFFERED=1
nvidia-smi > $R/gpu.txt 2>&1
python3 -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())" | tee -a $R/gpu.txt
save() { tar czf $OUT/results.tgz -C $R . ; }
trap save EXIT
P="bert preln b128 cudagraphs,bert sas_p_nonorm b128 cudagraphs,bert sas_p_nonorm b128 cudagraphs mixk"
P="$P,bert sas_p b128 cudagraphs,gpt2 preln b16 cudagraphs,gpt2 sas_p_nonorm b16 cudagraphs"
timeout 370 python3 -u benchmarks/train_profile.py --sections steps --plan "$P" --budget 330 --out $R/steps \
  > $R/steps_log.txt 2>&1
grep -v "^ " $R/steps_log.txt | grep "ms/step\|skipped\|failed"
save
timeout 130 python3 -u benchmarks/prefill_profile.py --out $R/prefill --budget 100 > $R/prefill_log.txt 2>&1
grep "^\[" $R/prefill_log.txt
