#!/usr/bin/env bash
# Prepared 2026-12-07 15:15 UTC with 296 s of device time left: the GPU checks of what was built after 14:16, no
# timing. (a) the gated form's gradients through both backward routes against float64 (gated_attention.BACKWARD
# "passes" and "fla": dk, dv from fla's chunk_bwd_dh / chunk_bwd_dv), float32 and bf16, 48 features against 64;
# (b) NOBLE's split-K decoding layer against its one-launch kernel and float64. Expected: all pass.
source docs/gpu/preamble.sh callT
timeout 80 python3 -m pytest -q -rs -p no:cacheprovider tests/test_noble_decode.py -k "split" > $R/pytest_noble_log.txt 2>&1
tail -3 $R/pytest_noble_log.txt
save
timeout 100 python3 -m pytest -q -rs -p no:cacheprovider tests/test_device_equivalence.py -k "gated_backward_routes" \
  > $R/pytest_gated_log.txt 2>&1
tail -3 $R/pytest_gated_log.txt
