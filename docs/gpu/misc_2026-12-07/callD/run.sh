#!/usr/bin/env bash
# Prepared 2026-12-07 00:15–01:25 UTC, NOT RUN: the session's device time ran out (four starts that got no machine
# cost 631 s of it). What the next GPU call should time first (≈ 10 min on an H100), all built and CPU-tested since
# the last call (tree e896f4b and after):
# (1) issues #13/#14: lone attention calls with our ops called directly in eager (leanformer/ops/eager_op.py)
#     against the registered-op path, host time by op and by Python function. Expected: DiJiang's lone call at
#     1K (host-bound) 2.08 ms -> ~1.6; at 4K wall -> GPU time (1.32 ms), i.e. >= 1.0x SDPA (1.51 ms GPU).
# (2) issue #15: NOBLE's decoding step with q, k, v in one launch (fused_inputs.fuse_noble_linears) against apart.
#     Expected: 0.721 -> ~0.59 ms at 512 x 1 (24 launches fewer); then bench decode NOBLE vs Pre-LN at b 1, 8, 32.
# (3) issue #15: the 8K prefill with the boundary terms and the running normaliser compiled on CUDA and the ops
#     called directly (expected: DiJiang 53 -> ~40 ms, softmax 17: still host-bound), and with each chunk as one
#     compiled graph (StaticDecoder(compile_prefill=True)), for DiJiang and softmax. Expected: wall time near the
#     kernels' (13.5 and 13.3 ms) once compiled (3 graphs per model, paid in the first of the three prefills).
# (2c) 2026-12-07 02:25: NOBLE's z computed once per layer by a few programs the others wait for
#      (noble_decode.SHARED_Z; last, since a hang would stop what follows). DiJiang's variants (4) moved to
#      callF/run.sh with the head's argmax kernel.
# (2b) 2026-12-07 02:03–02:10: the NOBLE kernel with its epilogue loads before the K loop (noble_decode.PREFETCH), and
#      with the MLP's GELU in its epilogue too (noble_decode.ACTIVATION_IN_KERNEL).
# (3) moved to callE/run.sh (the 8K prefill), so that each call stays well under 10 minutes.
# (4) issue #15: DiJiang's step with the few-row products in 8-column multiply-add blocks (skinny_linear.FMA_COLUMNS:
#     the 768-wide outputs on 96 programs instead of 48), and the two untimed single switches (two-pass argmax;
#     norms in products). A gain here moves 32K x 8 (9.77x) toward its 10x: rerun bench decode there with it.
R=/tmp/r_callD; rm -rf $R; mkdir -p $R; export PYTHONUNBUFFERED=1
nvidia-smi > $R/gpu.txt 2>&1
python3 -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())" | tee -a $R/gpu.txt
save() { tar czf $OUT/results.tgz -C $R . ; }
trap save EXIT
timeout 80 python3 -u benchmarks/attention_host_profile.py --out $R/host --op-path-too \
  --methods softmax,dijiang_fused,dijiang_official_fused,shaped --lengths 1024,4096 --repeats 20 --profiled 3 \
  > $R/host_log.txt 2>&1
grep "^\[" $R/host_log.txt
save
V="noble 512 x1 compiled, NOBLE kernel;noble 512 x1 compiled, NOBLE kernel, q k v apart;preln 512 x1 compiled"
V="$V;noble 512 x1 compiled, NOBLE kernel, prefetch;noble 512 x1 compiled, NOBLE kernel, prefetch, GELU in kernel"
V="$V;noble 512 x1 compiled, NOBLE kernel, shared z, GELU in kernel"
timeout 220 python3 -u benchmarks/decode_profile.py --out $R/profile --budget 190 --variants "$V" > $R/profile_log.txt 2>&1
grep "^\[" $R/profile_log.txt
save
timeout 110 python3 -m leanformer bench decode --size gpt2 --arms preln,noble_fused --contexts 512 --batches 1,8,32 \
  --compile --time-budget 95 --out $R/noble > $R/noble_log.txt 2>&1
grep "bench decode\]" $R/noble_log.txt
