#!/usr/bin/env bash
# One part of `leanformer compare --preset gpu` (GPT-2 small, 101.6M tokens per arm) on one GPU machine that
# keeps nothing afterwards: train the arms named, then copy only their small result files to OUT
# (compare.json, tokenizer.json + arms/<arm>/{done.json,metrics.jsonl,config.yaml}: at most 8
# files for two arms, 2 folders down). The run is stopped at LIMIT seconds (default 580) so that what it
# has written (metrics.jsonl grows as it trains) still comes back.
# Assemble the parts wherever they were fetched to:
#   leanformer compare --report-only --from part_preln part_noble ... --out docs/compare_gpu
# Usage: [LIMIT=580] [TOKENIZER=path/tokenizer.json] bash benchmarks/compare_gpu.sh ARMS OUT [--set k=v ...]
#   ARMS: preln,dijiang_convert (the baseline and its conversion together) | noble | noble_silu | sas_p |
#         sas_p_nonorm | sas_p_nonorm_untied | dijiang_scratch  (one per 10-minute run)
#   TOKENIZER: the first part's tokenizer.json, so every part tokenises the same corpus the same way
set -uo pipefail
arms=${1:?usage: bash benchmarks/compare_gpu.sh ARMS OUT [--set k=v ...]}
out=${2:?usage: bash benchmarks/compare_gpu.sh ARMS OUT [--set k=v ...]}
shift 2
work=$(mktemp -d)
extra=(--set "data.cache_dir=$work/cache")
[ -n "${TOKENIZER:-}" ] && extra+=(--set "data.tokenizer=$(realpath "$TOKENIZER")")
t0=$(date +%s)
timeout --signal=INT --kill-after=20 "${LIMIT:-580}" "${PYTHON:-python3}" -m leanformer compare --preset gpu --arms "$arms" \
  --without-baseline --out "$work" --no-progress "${extra[@]}" "$@"
status=$?
echo "compare exited with status $status after $(( $(date +%s) - t0 )) s"
mkdir -p "$out"
[ -f "$work/compare.json" ] && cp "$work/compare.json" "$out/"
meta=$(ls "$work"/cache/*/meta.json 2>/dev/null | head -n 1)
if [ -n "$meta" ]; then
  python3 -c "import json,sys; d=json.load(open(sys.argv[1])); d.pop(\"identity\", None); print(\"data:\", d)" "$meta"
  [ -z "${TOKENIZER:-}" ] && cp "$(dirname "$meta")/tokenizer.json" "$out/"
fi
for dir in "$work"/arms/*/; do
  [ -d "$dir" ] || continue
  arm=$(basename "$dir")
  mkdir -p "$out/arms/$arm"
  for f in done.json metrics.jsonl config.yaml; do [ -f "$dir/$f" ] && cp "$dir/$f" "$out/arms/$arm/"; done
done
echo "part written to $out: $(cd "$out" && find . -type f | tr '\n' ' ')"
exit $status
