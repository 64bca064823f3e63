#!/usr/bin/env bash
# GPU training call of 2026-12-06 (issue #13): the crammed-BERT shape (16 × 768, seq 128, vocab 32,768),
# never measured before, and SAS-P's FLOP-limit share at GPT-2 small (last measured 2026-11-24), all
# compiled with CUDA graphs, one process, medians; first NOBLE (stacked, CosNet kernels) with z in a buffer of
# its own (its peak memory against Pre-LN's: target <= 1.05x); SAS-P with its mix in the new Triton kernels
# (shaped.MIX_KERNEL, 'mixk') beside the PyTorch form. Everything lands in one tarball under $OUT.
R=/tmp/r; mkdir -p $R; export PYTHONUNBUFFERED=1
nvidia-smi > $R/gpu.txt 2>&1; git rev-parse --short HEAD >> $R/gpu.txt 2>&1
python3 -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())" | tee -a $R/gpu.txt
save() { tar czf $OUT/results.tgz -C $R . ; }
trap save EXIT
timeout 80 python3 -m pytest -q -p no:cacheprovider tests/test_shaped_mix_kernel.py tests/test_device_equivalence.py \
  -k "mix or (graph_replay and not fla)" > $R/pytest.txt 2>&1
tail -2 $R/pytest.txt
P="gpt2 preln b16 cudagraphs,gpt2 noble_fused b16 cudagraphs cosk,gpt2 sas_p b16 cudagraphs mixk"
P="$P,gpt2 sas_p b16 cudagraphs,bert preln b128 cudagraphs,bert sas_p_nonorm b128 cudagraphs mixk"
P="$P,bert sas_p b128 cudagraphs mixk"
timeout 320 python3 -u benchmarks/train_profile.py --sections steps --plan "$P" --budget 280 --out $R/steps \
  > $R/steps_log.txt 2>&1
grep -v "^ " $R/steps_log.txt | tail -30
save
# issue #14's 4K attention target: lone-call wall time against a CUDA graph replay of the same call
for g in "" "--graphs"; do
  timeout 70 python3 -m leanformer bench attention --lengths 4096 --methods \
    softmax,dijiang_fused,dijiang_official_fla,dijiang_official_fused,dijiang_fla $g --repeats 10 \
    --out $R/attention${g:+_graphs} > $R/attention${g:+_graphs}_log.txt 2>&1
  grep "bench attention" $R/attention${g:+_graphs}_log.txt
done
