#!/usr/bin/env bash
# Sourced by a GPU call's run.sh (from the repository root): `source docs/gpu/preamble.sh NAME`.
# Makes the results folder R=/tmp/r_NAME, records the GPU and the versions in $R/gpu.txt, and tars $R into
# $OUT/results.tgz at exit and whenever the script calls `save` (so a call cut by its time limit keeps its files).
R=/tmp/r_$1; rm -rf "$R"; mkdir -p "$R"; export PYTHONUNBUFFERED=1
nvidia-smi > "$R/gpu.txt" 2>&1
python3 -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())" \
  | tee -a "$R/gpu.txt"
save() { tar czf "$OUT/results.tgz" -C "$R" . ; }
trap save EXIT
