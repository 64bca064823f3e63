#!/usr/bin/env bash
# Prepared 2026-12-07 08:30-08:55 UTC, after the 08:11-08:26 calls (docs/benchmarks.md). Issue #15, ≈ 9 min:
# (0) GPU pytest: the prefill graph against a fresh prefill (softmax, SAS-P, DiJiang, NOBLE), restart, CUDA graphs.
# (1) bench decode NOBLE at 512 x 32 and x 8 with its one-kernel layer off (--kernels noble=eager: the stacked
#     product, CosNet and the up product as Inductor compiles them): 1.084 ms against softmax's 0.711 with the
#     kernel (08:22), whose programs each recompute z for all 32 rows. Expected: better at batch 32 if the
#     recompute is what costs.
# (2) prefill_profile: the 8K prefill replayed from a CUDA graph (StaticDecoder(prefill_graph=True), built
#     08:30-08:55), softmax and DiJiang at one chunk of 8,192 and at chunks of 4,096, against the same eager
#     (DiJiang's best so far 17.9 ms wall for 8.3 ms of kernels, compiled whole; softmax's 11.2 for 9.5, eager
#     at one chunk: the target DiJiang <= softmax missed by host time). Expected: each wall near its kernels,
#     DiJiang's eager-graph prefill ≈ 11.6 ms at one chunk (its eager kernels) against softmax's ≈ 9.5; last,
#     DiJiang compiled whole and replayed from a graph (≈ 4 min of compiling: the whole model twice, before
#     and after a restart; ≈ 8.3 ms expected, below softmax's 9.5: the target). callL pairs the compiled
#     graphs of both at one chunk of 8,192.
R=/tmp/r_callK; rm -rf $R; mkdir -p $R; export PYTHONUNBUFFERED=1
nvidia-smi > $R/gpu.txt 2>&1
python3 -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())" | tee -a $R/gpu.txt
save() { tar czf $OUT/results.tgz -C $R . ; }
trap save EXIT
timeout 100 python3 -m pytest -q -p no:cacheprovider tests/test_decoding.py -k "prefill_graph or restart or cuda_graph" \
  > $R/pytest_log.txt 2>&1
tail -2 $R/pytest_log.txt
save
timeout 130 python3 -m leanformer bench decode --size gpt2 --arms preln,noble_fused --contexts 512 --batches 32,8 \
  --compile --kernels noble=eager --time-budget 115 --out $R/noble_eager > $R/noble_eager_log.txt 2>&1
grep "bench decode\]" $R/noble_eager_log.txt
save
V="preln 8K chunk 8192;dijiang 8K chunk 8192, fused ≤ 8192;preln 8K chunk 8192, graph;dijiang 8K chunk 8192, fused ≤ 8192, graph;preln 8K chunk 4096, graph;dijiang 8K chunk 4096, graph;dijiang 8K chunk 4096, compiled whole model, graph"
timeout 330 python3 -u benchmarks/prefill_profile.py --out $R/prefill --budget 300 --variants "$V" > $R/prefill_log.txt 2>&1
grep "^\[" $R/prefill_log.txt
