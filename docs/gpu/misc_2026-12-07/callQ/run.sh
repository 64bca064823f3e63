#!/usr/bin/env bash
# Prepared 2026-12-07 14:50 UTC, tree after debe94a. ≈ 8 min.
# (0) GPU pytest of the gated route, 300 s (callM/callO gave 90-100 s and fla's autotuning of each kernel, per dtype
#     and shape, cut them after their first CUDA case): fla's gated forward in float32 and bf16, both backward routes
#     (gated_attention.BACKWARD "passes" and "fla": dk, dv from fla's chunk_bwd_dh/chunk_bwd_dv) against float64, a
#     model's loss and gradients gated vs the default route, a gated prompt continued from a state, the model's
#     decoding with gated prompts (now the default), the prefill graph's replays. Expected: all pass; if "fla" fails,
#     BACKWARD stays "passes". (Added 15:25: tests/conftest.py now gives each of fla's autotuned kernels its first
#     config on CUDA, so these tests no longer compile fla's up to 192 configs per kernel; expected well under 300 s.)
# (1) train_profile: Pre-LN b16 under CUDA graphs with and without the logits returned (issue #13). Expected: the
#     0.50 ms bf16 fill and the 1.09 ms copy of the logits' unused gradient gone without them (callO, callN3):
#     ≈ 39.8 → 38.2 ms per step (+4% tokens/s). Then the head and the loss in chunks of 4,096 tokens
#     (linear_cross_entropy.FUSED, added 15:10): the log-softmax kernels' 2.84 ms become ≈ 4.9 GB of element-wise
#     traffic (≈ 1.7 ms) plus ≈ 0.4 ms of float32 dW sums: ≈ 37.5 ms, if Inductor fuses each chunk's softmax
#     and gradient into one or two kernels; profiled, so the kernels that cost are named.
# (3) added 16:30: each run also times 5 steps per synchronisation (back-to-back ms). callO's Pre-LN b16 step was
#     39.83 ms for 37.05 ms of kernels: if the 2.8 ms gap is the host's work before each synchronised step's first
#     kernel, back to back is ≈ 37-38 ms; if it stays ≈ 39.8, the gaps are inside the step.
source docs/gpu/preamble.sh callQ
timeout 200 python3 -m pytest -q -rs -p no:cacheprovider tests/test_device_equivalence.py tests/test_decoding.py \
  -k "gated or prefill_graph_replays" > $R/pytest_log.txt 2>&1
tail -6 $R/pytest_log.txt
save
# (2) added 2026-12-07 16:25: SAS-P and SAS-P without norms, now without the logits, so #13's realised share of
#     their FLOP limit is re-measured beside this call's Pre-LN (89.9-90.9% and 95.3% before, with them).
P="gpt2 preln b16 cudagraphs,gpt2 preln b16 cudagraphs logits,gpt2 preln b16 cudagraphs fusedloss,gpt2 sas_p b16 cudagraphs,gpt2 sas_p_nonorm b16 cudagraphs"
timeout 370 python3 -u benchmarks/train_profile.py --sections steps --plan "$P" --budget 330 --out $R/steps \
  > $R/steps_log.txt 2>&1
grep "^\[" $R/steps_log.txt | tail -5
