#!/usr/bin/env bash
# Prepared 2026-12-07 12:20 UTC. Issue #15's NOBLE ≥ 0.9× softmax at batch 32 (0.66×: 1.084 against 0.711 ms,
# H100 2026-12-07 08:22; never profiled at this batch), ≈ 6 min: decode_profile.py at 512 × 32, Pre-LN and NOBLE
# (its one-kernel layer), then NOBLE with 8 warps and with 32-column blocks. Expected: the NOBLE launches take the
# extra 0.37 ms (72 launches: ≈ 5 µs each more than Pre-LN's products of the same shapes); if z's recomputation is
# what costs, 32-column blocks halve it (48 → 24 programs for a 768-wide output, each with the same z work).
# Then (≈ 1 min, issue #13) step_copies.py: the 16 Memcpy DtoD (1.11 ms) of Pre-LN's b16 step under CUDA graphs
# (callJ), each with its bytes and the host op that issued it. Expected: copies the size of weights or gradients
# (≈ 0.8 GB moved per step in all), issued by CUDA graph trees or the optimizer, not by the model.
source docs/gpu/preamble.sh callN
V="preln 512 x32 compiled;noble 512 x32 compiled, NOBLE kernel;noble 512 x32 compiled, NOBLE kernel, 8 warps;noble 512 x32 compiled, NOBLE kernel, 32-column blocks"
timeout 380 python3 -u benchmarks/decode_profile.py --out $R/profile --budget 320 --variants "$V" > $R/profile_log.txt 2>&1
grep "^\[" $R/profile_log.txt
save
timeout 150 python3 -u benchmarks/step_copies.py --arm preln --batch 16 --mode reduce-overhead --out $R/copies \
  > $R/copies_log.txt 2>&1
head -30 $R/copies_log.txt
