#!/usr/bin/env bash
# Run 2026-12-07 19:22 UTC on the machine callAA left warm (its /tmp/site with fla kept), with the last 75 s of device
# time: callAA's third run, which its --budget 100 had skipped. The command as sent (one line in the call):
#   export PYTHONPATH=/tmp/site:$PWD:$PWD/benchmarks; source docs/gpu/preamble.sh callAB; timeout 62 python3 -u \
#     benchmarks/train_profile.py --sections steps --plan "gpt2 preln b32 cudagraphs fusedloss whole learnedpos" \
#     --budget 60 --out $R/steps > $R/steps_log.txt 2>&1; grep "^\[" $R/steps_log.txt | tail -1
# Expected (callAA's header): ≈ 65 ms, ≈ 500,000 tokens/s.
export PYTHONPATH=/tmp/site:$PWD:$PWD/benchmarks
source docs/gpu/preamble.sh callAB
timeout 62 python3 -u benchmarks/train_profile.py --sections steps --plan "gpt2 preln b32 cudagraphs fusedloss whole learnedpos" \
  --budget 60 --out $R/steps > $R/steps_log.txt 2>&1
grep "^\[" $R/steps_log.txt | tail -1
