#!/usr/bin/env bash
# Prepared 2026-12-07 17:30 UTC. ≈ 4 min. train.compile_mode (added 17:25): the trainer (`leanformer train`, config
# gpt2_small, the built-in corpus) 40 steps with torch.compile's default mode and with reduce-overhead (CUDA graphs),
# one process, grad_accum 1. Expected: the same losses within bf16 noise (the same seed and batches), and tokens/s
# within a few % of each other (bench's Pre-LN GPT-2 step b16 took 39.42 ms in default mode and 39.25 with CUDA
# graphs, H100 2026-12-05; the trainer's step adds gradient clipping and a loss read). If both hold, the mode is
# safe to offer for NOBLE, whose step CUDA graphs shortened 1.65x in bench (kcat, 90.44 -> 54.75 ms).
source docs/gpu/preamble.sh callX
for mode in default reduce-overhead; do
  timeout 170 python3 -m leanformer train --config gpt2_small --out /tmp/train_$mode --no-resume \
    --set train.steps=40 --set train.eval_every=40 --set train.eval_batches=2 --set train.log_every=1 \
    --set train.progress=false --set train.save_every_minutes=0 --set train.compile_mode=$mode \
    > $R/train_$mode.log 2>&1
  cp /tmp/train_$mode/metrics.jsonl $R/metrics_$mode.jsonl 2>/dev/null
  save
done
python3 - "$R" <<'PY' | tee $R/summary.txt
import json, statistics, sys
rows = {}
for mode in ("default", "reduce-overhead"):
    try:
        recs = [json.loads(l) for l in open(f"{sys.argv[1]}/metrics_{mode}.jsonl")]
    except OSError:
        print(mode, "no metrics"); continue
    steps = [r for r in recs if "loss" in r]
    rows[mode] = steps
    tps = statistics.median(r["tok_per_s"] for r in steps if r["step"] > 10)
    print(f"{mode}: median tok/s over steps 11-40 {tps:,.0f}; losses at 10, 20, 30, 40:",
          [round(r["loss"], 4) for r in steps if r["step"] % 10 == 0])
if len(rows) == 2:
    d = max(abs(a["loss"] - b["loss"]) / abs(b["loss"]) for a, b in zip(*rows.values()))
    print(f"max relative loss difference over {len(rows['default'])} steps: {d:.2e}")
PY
