#!/usr/bin/env bash
# GPU call 3 of 2026-12-06 (issue #15): call 2's switches again after the '_grid_2' launch fix (9b1a355),
# and NOBLE's one-kernel decode layer timed. Run from the repo root on the device machine after the fla
# wheels are installed and PYTHONPATH is set; everything lands in one tarball under $OUT.
R=/tmp/r; mkdir -p $R; export PYTHONUNBUFFERED=1
nvidia-smi > $R/gpu.txt 2>&1; git rev-parse --short HEAD >> $R/gpu.txt 2>&1
python3 -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())" | tee -a $R/gpu.txt
save() { tar czf $OUT/results.tgz -C $R . ; }
trap save EXIT
timeout 80 python3 -m pytest -q -p no:cacheprovider tests/test_norm_linear.py tests/test_kernel_launches.py \
  -k "not generate" > $R/pytest.txt 2>&1
tail -3 $R/pytest.txt
V="dijiang 8K x8 compiled,dijiang 8K x8 compiled, norms in products"
V="$V,dijiang 8K x8 compiled, norms in products, single pass, two-pass argmax,dijiang 8K x8 compiled, two-pass argmax"
V="$V,preln 8K x8 compiled,preln 8K x8 compiled, norms in products"
V="$V,noble 512 x1 graph, NOBLE kernel,noble 512 x1 graph,preln 512 x1 graph"
V="$V,noble 512 x1 compiled, NOBLE kernel,noble 512 x1 compiled,preln 512 x1 compiled,sas_p 512 x1 compiled"
timeout 330 python3 -u benchmarks/decode_profile.py --out $R/profile --budget 300 --variants "$V" > $R/profile_log.txt 2>&1
grep "^\[" $R/profile_log.txt
save
for k in default switched; do
  extra=""; [ $k = switched ] && extra="--kernels argmax=two-pass,norms=in-products"
  timeout 100 python3 -m leanformer bench decode --size gpt2 --arms preln,dijiang_scratch --contexts 32768 \
    --batches 8 --compile $extra --out $R/bench_$k > $R/bench_${k}_log.txt 2>&1
  tail -4 $R/bench_${k}_log.txt
  save
done
