#!/usr/bin/env bash
# Issue 10: DDP and FSDP2 scaling on the GPUs of one host, in one call of at most ~9 minutes.
# For the baseline (preln) and SAS-P+NOBLE at GPT-2-small scale (leanformer/configs/gpt2_small.yaml), each with DDP and FSDP2:
#   (a) 1 GPU, per-GPU batch B: tokens/s of one GPU;  (b) N GPUs, batch B each: tokens/s per GPU, peak memory;
#   (c) 1 GPU, batch N*B (the same global batch as (b)): its first losses must equal (b)'s.
# Usage on the device machine:  bash benchmarks/multigpu.sh [STEPS] [B]      (outputs under $OUT)
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
OUT="${OUT:-$PWD/multigpu_out}"; mkdir -p "$OUT"
STEPS="${1:-30}"; B="${2:-8}"
N=$(python3 -c "import torch; print(torch.cuda.device_count())")
echo "GPUs: $N; steps $STEPS; per-GPU batch $B"; nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -m leanformer train --config gpt2_small --out "$OUT/warm" --set train.steps=1 --no-resume \
  --set train.progress=false >/dev/null 2>&1  # tokenise the corpus once
common=(--config gpt2_small --no-resume --set train.steps="$STEPS" --set train.eval_every=100000
        --set train.log_every=1 --set train.progress=false --set train.warmup_frac=0.0)
declare -A ARM=([preln]="" [sas_p_noble]="--set model.block=sas_p --set model.attention=shaped --set model.noble.enabled=true")
for arm in preln sas_p_noble; do
  for mode in ddp fsdp; do
    tag="${arm}_${mode}"
    python3 -m leanformer train "${common[@]}" ${ARM[$arm]} --set train.distributed=$mode \
      --set train.batch_size="$B" --out "$OUT/runs/${tag}_1gpu" > "$OUT/${tag}_1gpu.log" 2>&1 || echo "FAILED $tag 1gpu"
    if [ "$N" -gt 1 ]; then
      torchrun --standalone --nproc_per_node="$N" -m leanformer train "${common[@]}" ${ARM[$arm]} \
        --set train.distributed=$mode --set train.batch_size="$B" --out "$OUT/runs/${tag}_${N}gpu" \
        > "$OUT/${tag}_${N}gpu.log" 2>&1 || echo "FAILED $tag ${N}gpu"
      python3 -m leanformer train "${common[@]}" ${ARM[$arm]} --set train.steps=5 \
        --set train.batch_size=$((N * B)) --out "$OUT/runs/${tag}_1gpu_global" > "$OUT/${tag}_global.log" 2>&1 \
        || echo "FAILED $tag 1gpu global batch"
    fi
  done
done
python3 benchmarks/multigpu_summary.py "$OUT/runs" "$N" | tee "$OUT/multigpu.md"
