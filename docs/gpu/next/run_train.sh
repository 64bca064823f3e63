#!/usr/bin/env bash
# Prepared 2026-12-06 (night), not run yet (issue #13, ≈ 6 min on an H100): crammed BERT (causal, 16 × 768, seq 128
# × 128) with every SAS-P step profiled, so that the gap to the paper's 1.16× / 1.20× has kernel names; the mix
# kernel now taken by SAS's float32 values (b8aacf4); and SAS-P without norms at GPT-2 (its FLOP-limit share was
# last measured 2026-11-24). Pre-LN beside each in the same process. One tarball under $OUT.
R=/tmp/r_next_train; rm -rf $R; mkdir -p $R; export PYTHONUNBUFFERED=1
nvidia-smi > $R/gpu.txt 2>&1
python3 -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())" | tee -a $R/gpu.txt
save() { tar czf $OUT/results.tgz -C $R . ; }
trap save EXIT
P="bert preln b128 cudagraphs,bert sas_p_nonorm b128 cudagraphs,bert sas_p_nonorm b128 cudagraphs mixk"
P="$P,bert sas_p b128 cudagraphs,gpt2 preln b16 cudagraphs,gpt2 sas_p_nonorm b16 cudagraphs"
timeout 380 python3 -u benchmarks/train_profile.py --sections steps --plan "$P" --budget 340 --out $R/steps \
  > $R/steps_log.txt 2>&1
grep -v "^ " $R/steps_log.txt | grep "ms/step\|skipped\|failed"
