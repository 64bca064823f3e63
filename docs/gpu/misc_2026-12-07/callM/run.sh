#!/usr/bin/env bash
# Prepared 2026-12-07 11:35-11:55 UTC. Issue #15's 8K prefill with DiJiang's prompt through fla's chunk kernel and
# one gate per token (dijiang.GATED_FLA_PROMPTS, dla.fla_gated, leanformer/ops/token_gates.py), ≈ 6 min:
# (0) GPU pytest: fla_gated against float64 (forward, a prompt continued from a state), the model's decoding with
#     gated prompts, the prefill graph with gated prompts against a fresh (ungated) decoder.
# (1) prefill_profile: softmax compiled whole + graph (6.7 ms wall / 6.6 kernels at 11:21, callL) in the same call,
#     then DiJiang with gated fla at one chunk of 8,192: eager, eager + graph, compiled whole + graph.
#     Expected: the fused kernel's 3.35 ms (12 calls, quadratic) becomes fla's chunk_fwd_h + chunk_fwd_o, linear:
#     B 1, H 12, T 8192, m = d = 64 is 2·T·m·d·H·(2 + 64/…) ≈ 2–4 GFLOP per layer with the intra-chunk part,
#     ≈ 30–60 µs each, ≈ 0.5 ms for 12; the float32 state product (0.36 ms) goes too. DiJiang compiled + graph
#     ≈ 8.8 − 3.35 − 0.36 + 0.5 ≈ 5.6 ms against softmax's 6.7: the target met if fla compiles inside the whole
#     model (else the eager + graph variant, ≈ 11.5 − 3.7 ≈ 8 ms, shows the kernel's share).
#     (Cut 11:55 to fit 370 s of device time left: DiJiang chunks of 4,096 compiled whole + graph took 8.5 ms at
#     11:18 on the same kind of machine, callK; the GPU tests narrowed to the gated ones and the prefill graph.)
source docs/gpu/preamble.sh callM
timeout 90 python3 -m pytest -q -p no:cacheprovider tests/test_device_equivalence.py tests/test_decoding.py \
  -k "gated or prefill_graph_replays" > $R/pytest_log.txt 2>&1
tail -4 $R/pytest_log.txt
save
V="preln 8K chunk 8192, compiled whole model, graph;dijiang 8K chunk 8192, gated fla;dijiang 8K chunk 8192, gated fla, graph;dijiang 8K chunk 8192, gated fla, compiled whole model, graph"
timeout 330 python3 -u benchmarks/prefill_profile.py --out $R/prefill --budget 200 --variants "$V" > $R/prefill_log.txt 2>&1
grep "^\[" $R/prefill_log.txt
