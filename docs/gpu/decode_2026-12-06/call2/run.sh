#!/usr/bin/env bash
# GPU call 2 of 2026-12-06 (issue #15): the untimed decode switches. Run from the repo root on the device
# machine after the fla wheels are installed and PYTHONPATH is set; everything lands in one tarball under $OUT.
R=/tmp/r; mkdir -p $R; export PYTHONUNBUFFERED=1
nvidia-smi > $R/gpu.txt 2>&1; git rev-parse --short HEAD >> $R/gpu.txt 2>&1
python3 -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())" | tee -a $R/gpu.txt
save() { tar czf $OUT/results.tgz -C $R . ; }
trap save EXIT
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_skinny_linear.py tests/test_noble_decode.py \
  tests/test_norm_linear.py tests/test_fused_decay_step.py -k "not generate" > $R/pytest.txt 2>&1
tail -4 $R/pytest.txt
timeout 270 python3 -u benchmarks/decode_profile.py --out $R/profile --budget 210 > $R/profile_log.txt 2>&1
grep "^\[" $R/profile_log.txt
save
for k in default switched; do
  extra=""; [ $k = switched ] && extra="--kernels step=single,argmax=two-pass,norms=in-products"
  timeout 130 python3 -m leanformer bench decode --size gpt2 --arms preln,dijiang_scratch --contexts 32768 \
    --batches 8 --compile $extra --out $R/bench_$k > $R/bench_${k}_log.txt 2>&1
  tail -6 $R/bench_${k}_log.txt
  save
done
