#!/usr/bin/env bash
# Last GPU call of 2026-12-06 (≈ 4 min): (1) the shaped mix kernel's tests on the GPU after float32 values beside a
# bf16 SDPA output were allowed (SAS under autocast; the 21:55 step refused the kernel for that) and the chunk
# length made to fill the GPU, plus bench attention's graph-replay test; (2) SAS-P's GPT-2 step with and without
# the kernel (issue #13), its profile naming the kernel; (3) NOBLE's one-kernel decoding layer, compiled step, 512
# x 1 (issue #15; the 22:03 call's labels were split at their commas and never ran). One tarball under $OUT.
R=/tmp/r_final; rm -rf $R; mkdir -p $R; export PYTHONUNBUFFERED=1
nvidia-smi > $R/gpu.txt 2>&1
python3 -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())" | tee -a $R/gpu.txt
save() { tar czf $OUT/results.tgz -C $R . ; }
trap save EXIT
timeout 70 python3 -m pytest -q -p no:cacheprovider tests/test_shaped_mix_kernel.py tests/test_device_equivalence.py \
  -k "not device_equivalence or mix or (graph_replay and not fla)" > $R/pytest.txt 2>&1
tail -2 $R/pytest.txt
timeout 130 python3 -u benchmarks/train_profile.py --sections steps --budget 120 --out $R/steps \
  --plan "gpt2 sas_p b16 cudagraphs mixk,gpt2 sas_p b16 cudagraphs,gpt2 preln b16 cudagraphs" > $R/steps_log.txt 2>&1
grep -v "^ " $R/steps_log.txt | grep "ms/step\|skipped\|failed"
save
timeout 75 python3 -u benchmarks/decode_profile.py --out $R/decode --budget 60 \
  --variants "noble 512 x1 compiled, NOBLE kernel;noble 512 x1 compiled;preln 512 x1 compiled" > $R/decode_log.txt 2>&1
grep "^\[" $R/decode_log.txt
