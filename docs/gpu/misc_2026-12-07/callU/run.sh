#!/usr/bin/env bash
# Prepared 2026-12-07 16:55 UTC. ≈ 2 min. The two GPU failures of callQ (16:37), with their magnitudes now printed:
# the model trained through the gated route against the default route (float32, TF32 in fla): max relative error
# 5.52e-3 > 5e-3; and the bf16 decoding copy's state S after a graphed gated prefill against a fresh prefill by the
# default route (outputs equal within 2e-2, S not; the message named only the key). Expected: the model's largest
# errors in a small gradient (TF32 rounding on both routes, no O(1) error); S's mismatch a few elements by a few
# hundredths where S's entries are O(1) or larger (fla rounds the decayed v to bf16 before its state product).
source docs/gpu/preamble.sh callU
timeout 150 python3 -m pytest -q -rA -p no:cacheprovider \
  tests/test_device_equivalence.py::test_dijiang_model_trains_through_gated_fla_as_through_the_default \
  "tests/test_decoding.py::test_prefill_graph_replays_equal_a_fresh_prefill[dijiang-bf16-gated]" \
  > $R/pytest_log.txt 2>&1
grep -n "largest relative\|Mismatched\|Greatest\|passed\|failed" $R/pytest_log.txt | head -20
