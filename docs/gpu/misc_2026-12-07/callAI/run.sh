#!/usr/bin/env bash
# Prepared 2026-12-07 23:30 UTC. ≈ 7 min. Issue #13: the rotary tables by one opaque op (leanformer::rotary_tables).
# Inductor had fused the table into every element of q and k (a float64 angle, its remainder modulo 2π, a cos and a
# sin per element, forward and backward: the kernels named ..._cos_..._sin_... in callAF's profile, 1.32 + 0.39 +
# 0.88 ms per step at b16); now each rotation reads a (T, 64) table. Expected: the rotary kernels become memory-bound
# (q and k read and written, forward and backward: ≈ 2.4 GB per step at b16, ≈ 0.8-0.9 ms), so Pre-LN b16 with RoPE
# ≈ 1.0-1.5 ms faster (37.52 ms at 22:30, callAC; learned positions 35.08), b32 with RoPE ≈ 67-68 ms (70.43 in
# callAC: 465,236 tokens/s; 500,000 needs 65.5 ms), NOBLE's route ≈ 1.5-2.5 ms faster (its rotary backward 2.57 ms).
# (0) GPU pytest of the rotary tests (compiled tables equal the eager ones; float32 tables within 1e-6 of float64).
# (1) train_profile.py steps under CUDA graphs, Pre-LN's RoPE runs beside their "inlinerope" twins (the tables as
#     before, rope.COMPILED_TABLES "inline"): Pre-LN b16, Pre-LN b32 with the loss kernel, then learned positions b16
#     and SAS-P b16 (its share of the FLOP limit), as time allows. NOBLE's route with the new tables: callAJ, chained.
source docs/gpu/preamble.sh callAI
timeout 60 python3 -m pytest -q -rs -p no:cacheprovider tests/test_model.py tests/test_device_equivalence.py \
  -k "rotary" > $R/pytest_log.txt 2>&1
tail -3 $R/pytest_log.txt
save
C=docs/gpu/misc_2026-12-07/callAE/out/noble/two_segment_configs.json
[ -f $C ] && TS="--two-segment-configs $C" || TS=""
P="gpt2 preln b16 cudagraphs,gpt2 preln b16 cudagraphs inlinerope,gpt2 preln b32 cudagraphs fusedloss whole,gpt2 preln b32 cudagraphs fusedloss whole inlinerope,gpt2 preln b16 cudagraphs learnedpos,gpt2 sas_p b16 cudagraphs"
TORCH_LOGS=output_code TORCH_LOGS_OUT=$R/output_code.txt timeout 520 python3 -u benchmarks/train_profile.py --sections steps --plan "$P" --budget 500 --out $R/steps $TS \
  > $R/steps_log.txt 2>&1
grep "^\[" $R/steps_log.txt | tail -8
gzip -f $R/output_code.txt  # Inductor's generated code of every run (the rotary and GELU backward kernels, read here)
