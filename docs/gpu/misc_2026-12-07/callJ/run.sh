#!/usr/bin/env bash
# Prepared 2026-12-07 04:45 UTC. Issue #13: the training step under torch.compile's "max-autotune" (Inductor
# times its Triton matrix-product templates, with the bias, activation and NOBLE's branch add fused into their
# epilogues, against cuBLAS, shape by shape; CUDA graphs as "reduce-overhead") against "reduce-overhead",
# GPT-2 small seq 1024 b16, Pre-LN and NOBLE (stacked, CosNet kernels). Expected: Pre-LN within +-3% (cuBLAS
# wins most shapes); NOBLE's step the one that could gain (its +14.7 ms are element-wise passes over the
# stacked output: +38.3% on 2026-12-06), if a template takes the stacked product with the GELU or the add.
# Also NOBLE unfused (arm noble: main and down as two products), never timed under CUDA graphs, and (revised
# 2026-12-07 07:45) Pre-LN at batch 32 with CUDA graphs (482,562 tokens/s at b 32 without them, H200 2026-12-04;
# target 500,000).
R=/tmp/r_callJ; rm -rf $R; mkdir -p $R; export PYTHONUNBUFFERED=1
nvidia-smi > $R/gpu.txt 2>&1
python3 -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())" | tee -a $R/gpu.txt
save() { tar czf $OUT/results.tgz -C $R . ; }
trap save EXIT
P="gpt2 preln b16 cudagraphs,gpt2 noble_fused b16 cudagraphs cosk,gpt2 noble b16 cudagraphs cosk,gpt2 preln b32 cudagraphs,gpt2 preln b16 autotune,gpt2 noble_fused b16 autotune cosk"
timeout 560 python3 -u benchmarks/train_profile.py --sections steps --plan "$P" --budget 540 --out $R/steps \
  > $R/steps_log.txt 2>&1
grep -v "^ " $R/steps_log.txt | tail -14
