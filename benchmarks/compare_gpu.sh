#!/usr/bin/env bash
# One part of `leanformer compare --preset gpu` (GPT-2 small, 101.6M tokens per arm) on one GPU machine that
# keeps nothing afterwards: train the arms named, then copy only their small result files to OUT
# (compare.json + arms/<arm>/{done.json,metrics.jsonl,config.yaml}: at most 7 files, 2 folders deep).
# Assemble the parts wherever they were fetched to:
#   leanformer compare --report-only --from part_preln part_noble ... --out docs/compare_gpu
# Usage: bash benchmarks/compare_gpu.sh ARMS OUT
#   ARMS: preln,dijiang_convert (the baseline and its conversion together) | noble | noble_silu | sas_p |
#         sas_p_nonorm | dijiang_scratch  (one per 10-minute run)
set -euo pipefail
arms=${1:?usage: bash benchmarks/compare_gpu.sh ARMS OUT}
out=${2:?usage: bash benchmarks/compare_gpu.sh ARMS OUT}
work=$(mktemp -d)
python3 -m leanformer compare --preset gpu --arms "$arms" --without-baseline --out "$work" --no-progress \
  --set "data.cache_dir=$work/cache"
mkdir -p "$out"
cp "$work/compare.json" "$out/"
for dir in "$work"/arms/*/; do
  arm=$(basename "$dir")
  mkdir -p "$out/arms/$arm"
  cp "$dir"/done.json "$dir"/metrics.jsonl "$dir"/config.yaml "$out/arms/$arm/"
done
echo "part written to $out: $(cd "$out" && find . -type f | tr '\n' ' ')"
